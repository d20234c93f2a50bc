"""Scores shared by the protocols: segmentation confusion matrix (mIoU, mAcc), boxes and CorLoc, and the
upsampling of patch-grid predictions to label resolution."""
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .labels import IGNORE

__all__ = ['ConfusionMatrix', 'upsample_argmax', 'box_iou', 'corloc']


class ConfusionMatrix:
    """Accumulates (target, prediction) pixel counts over images.

    mIoU averages IoU over classes present in the target or the prediction (union > 0; a class that is
    only predicted counts as 0), mAcc averages per-class recall over classes present in the target - the
    usual semantic-segmentation conventions (e.g. mmsegmentation's).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape')
        valid = target != IGNORE
        t, p = target[valid].long(), pred[valid].long()
        K = self.num_classes
        self.matrix += torch.bincount(t * K + p, minlength=K * K).view(K, K)

    def scores(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        m = self.matrix.double()
        tp, gt, pr = m.diag(), m.sum(1), m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        total = float(gt.sum())
        return {
            'miou': float(iou[union > 0].mean()) if bool((union > 0).any()) else math.nan,
            'macc': float(acc[gt > 0].mean()) if bool((gt > 0).any()) else math.nan,
            'pixel_acc': float(tp.sum() / total) if total else math.nan,
            'per_class_iou': {n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, iou.tolist())},
        }


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
