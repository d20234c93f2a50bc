"""Scores shared by the protocols: segmentation confusion matrix (mIoU, mAcc) and its bootstrap over images,
boxes and CorLoc, and the upsampling of patch-grid predictions to label resolution."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .labels import IGNORE

__all__ = ['ConfusionMatrix', 'miou', 'bootstrap_miou', 'upsample_argmax', 'box_iou', 'corloc']


class ConfusionMatrix:
    """Accumulates (target, prediction) pixel counts over images.

    mIoU averages IoU over classes present in the target or the prediction (union > 0; a class that is
    only predicted counts as 0), mAcc averages per-class recall over classes present in the target - the
    usual semantic-segmentation conventions (e.g. mmsegmentation's). With `keep_images`, each `update`'s
    matrix is also kept (`image_matrices`), for `bootstrap_miou`.
    """

    def __init__(self, num_classes: int, keep_images: bool = False) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.images: Optional[List[torch.Tensor]] = [] if keep_images else None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape')
        valid = target != IGNORE
        t, p = target[valid].long(), pred[valid].long()
        K = self.num_classes
        if t.numel() and not (0 <= min(t.min(), p.min()) and max(t.max(), p.max()) < K):
            raise ValueError(f'class ids must be in [0, {K}) (or {IGNORE} in the target), got predictions in '
                             f'[{p.min()}, {p.max()}] and targets in [{t.min()}, {t.max()}]')
        matrix = torch.bincount(t * K + p, minlength=K * K).view(K, K)
        self.matrix += matrix
        if self.images is not None:
            self.images.append(matrix)

    def image_matrices(self) -> torch.Tensor:
        """The kept per-image matrices (N, K, K), in `update` order."""
        if self.images is None:
            raise RuntimeError('per-image matrices were not kept: create the ConfusionMatrix with keep_images=True')
        return torch.stack(self.images) if self.images else torch.zeros(0, self.num_classes, self.num_classes,
                                                                          dtype=torch.long)

    def scores(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        m = self.matrix.double()
        tp, gt, pr = m.diag(), m.sum(1), m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        total = float(gt.sum())
        return {
            'miou': float(miou(self.matrix)),
            'macc': float(acc[gt > 0].mean()) if bool((gt > 0).any()) else math.nan,
            'pixel_acc': float(tp.sum() / total) if total else math.nan,
            'per_class_iou': {n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, iou.tolist())},
        }


def miou(matrix: torch.Tensor) -> torch.Tensor:
    """mIoU of confusion matrices (..., K, K) (rows target, columns prediction), as `ConfusionMatrix.scores`
    counts it: the mean IoU over classes with a non-empty union; nan where no class has one."""
    m = matrix.double()
    tp = m.diagonal(dim1=-2, dim2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    present = union > 0
    return (tp / union.clamp_min(1)).sum(-1) / present.sum(-1)  # 0 / 0 = nan


def bootstrap_miou(
        image_matrices: Dict[str, torch.Tensor],
        baseline: Optional[str] = None,
        resamples: int = 1000,
        level: float = 0.95,
        seed: int = 0,
) -> Dict[str, Dict[str, object]]:
    """Percentile-bootstrap intervals of mIoU over the scored images, and of its change against `baseline`.

    `image_matrices` maps each variant to the per-image confusion matrices (N, K, K) of the same N images in
    the same order. Each resample draws N images with replacement, sums their matrices and takes the mIoU;
    every variant uses the same draws, so the change is paired: what the same images would give. Returns per
    variant `miou_ci` (low, high); variants other than `baseline` also get `change_ci` and
    `change_nonnegative`, the share of resamples in which they score at least the baseline. The interval
    covers which images are scored, not the protocols' other randomness (the memory bank, the probe's
    training images and seed).
    """
    if not 0 < level < 1:
        raise ValueError(f'level must be in (0, 1), got {level}')
    if resamples < 1:
        raise ValueError(f'resamples must be at least 1, got {resamples}')
    shapes = {tuple(m.shape) for m in image_matrices.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f'every variant needs (N, K, K) matrices of the same shape, got {sorted(shapes)}')
    if baseline is not None and baseline not in image_matrices:
        raise ValueError(f'baseline {baseline!r} is not among the variants {list(image_matrices)}')
    n, k = next(iter(shapes))[:2]
    if n == 0:
        raise ValueError('no scored images to resample')
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=g)
    weights = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64))
    chunk = max(1, 2 ** 22 // (k * k))  # resamples summed at once: ~32 MB of float64 matrices
    scores = {name: torch.cat([miou(torch.einsum('rn,nij->rij', w, m.double())) for w in weights.split(chunk)])
              for name, m in image_matrices.items()}

    def interval(x: torch.Tensor) -> Tuple[float, float]:
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=x.dtype)
        lo, hi = torch.nanquantile(x, q).tolist()
        return lo, hi

    out: Dict[str, Dict[str, object]] = {}
    for name, s in scores.items():
        out[name] = {'miou_ci': interval(s)}
        if baseline is not None and name != baseline:
            change = s - scores[baseline]
            out[name]['change_ci'] = interval(change)
            out[name]['change_nonnegative'] = float((change >= 0).double().mean())
    return out


def upsample_argmax(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly upsample class scores (K, h, w) to `size` (H, W) and take the argmax: (H, W) long."""
    up = F.interpolate(scores[None].float(), size=tuple(size), mode='bilinear', align_corners=False)[0]
    return up.argmax(0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (x0, y0, x1, y1), x1/y1 exclusive."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def corloc(pred: Sequence[Sequence[float]], gt: Sequence[List[Sequence[float]]], threshold: float = 0.5) -> float:
    """Correct localisation: the share of images whose predicted box has IoU >= `threshold` with any
    ground-truth box of that image (images without ground-truth boxes are not counted)."""
    hits = [any(box_iou(p, g) >= threshold for g in boxes) for p, boxes in zip(pred, gt) if boxes]
    return sum(hits) / len(hits) if hits else math.nan
