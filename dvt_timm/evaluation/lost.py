"""LOST-style unsupervised single-object discovery (Simeoni et al., BMVC 2021) on dense features.

LOST picks a seed patch, grows it with similar patches, and boxes the connected region around the seed. The
original seeds with the patch of lowest degree in the patch-similarity graph (its last-layer keys); here the
default seed score is the feature norm, which DVT shows marks objects once the features are denoised
(`seed='degree'` gives the original choice).
"""
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .labels import IGNORE
from .scores import corloc

__all__ = ['connected_components', 'lost_box', 'lost_discovery', 'boxes_from_label', 'read_boxes']

Box = Tuple[float, float, float, float]


def connected_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected components of a 2-D boolean mask: (labels int32 with 0 = background, count).

    Union-find over horizontal runs, so the cost follows the number of runs, not of pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f'mask must be 2-D, got shape {mask.shape}')
    H, W = mask.shape
    padded = np.zeros((H, W + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same row-major order as the starts
    parent = list(range(len(starts)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(rows_s, np.arange(H + 1))
    for r in range(H - 1):
        i, i_end = row_first[r], row_first[r + 1]
        j, j_end = row_first[r + 1], row_first[r + 2]
        while i < i_end and j < j_end:  # runs of adjacent rows that overlap in x are one component
            if starts[i] < ends[j] and starts[j] < ends[i]:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(a) for a in range(len(starts))], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)
    labels = np.zeros((H, W), dtype=np.int32)
    for r, s, e, c in zip(rows_s, starts, ends, comp):
        labels[r, s:e] = c + 1
    return labels, int(comp.max()) + 1 if len(comp) else 0


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def lost_box(feat: torch.Tensor, seed: str = 'norm', expand: int = 100) -> Tuple[Box, Tuple[int, int]]:
    """One object box on the patch grid of a (C, h, w) map: `((x0, y0, x1, y1) in patches, seed (row, col))`.

    Patches are compared by the cosine of their features after removing the image's mean feature (the final
    layer's large shared component would otherwise make every pair similar). Seed: the highest-norm patch
    ('norm') or the lowest-degree patch, degree = number of positively correlated patches ('degree').
    The seed set is the top-`expand` patches by the same score that correlate positively with the seed; the
    object is the 4-connected region, containing the seed, of patches whose summed similarity to the seed
    set is positive.
    """
    if feat.ndim != 3:
        raise ValueError(f'expected one feature map (C, h, w), got {tuple(feat.shape)}')
    if seed not in ('norm', 'degree'):
        raise ValueError(f"seed must be 'norm' or 'degree', got {seed!r}")
    C, h, w = feat.shape
    f = feat.float().flatten(1).T  # (n, C)
    sim = F.normalize(f - f.mean(0), dim=1)
    sim = sim @ sim.T
    if seed == 'norm':
        order = f.norm(dim=1).argsort(descending=True, stable=True)
    else:
        order = (sim > 0).sum(1).argsort(stable=True)
    s = int(order[0])
    candidates = order[:min(expand, len(order))]
    seeds = candidates[sim[s, candidates] > 0]
    mask = (sim[seeds].sum(0) > 0).view(h, w).numpy()
    comps, _ = connected_components(mask)
    row, col = divmod(s, w)
    region = comps == comps[row, col] if comps[row, col] else np.eye(1, h * w, s, dtype=bool).reshape(h, w)
    return _bbox(region), (row, col)


def boxes_from_label(label: torch.Tensor, classes: Optional[Sequence[int]] = None,
                     min_area: float = 0.01) -> List[Box]:
    """Object boxes derived from a semantic label (H, W): one per 4-connected region of each class in
    `classes` (contiguous ids; default every class but 0, taken as background) covering >= `min_area` of the
    image. An approximation of instance boxes: touching instances of one class merge and occluded ones split.
    """
    lab = label.numpy()
    ids = np.unique(lab[lab != IGNORE]) if classes is None else np.asarray(classes)
    if classes is None:
        ids = ids[ids != 0]
    boxes = []
    for c in ids.tolist():
        comps, count = connected_components(lab == c)
        if not count:
            continue
        areas = np.bincount(comps.ravel(), minlength=count + 1)
        for comp in range(1, count + 1):
            if areas[comp] >= min_area * lab.size:
                boxes.append(_bbox(comps == comp))
    return boxes


def read_boxes(path: Union[str, os.PathLike]) -> Dict[str, List[Box]]:
    """Boxes from JSON `{"<image stem>": [[x0, y0, x1, y1], ...], ...}` in original-image pixels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no boxes file at {path}')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: not JSON ({e})') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected {{"<image stem>": [[x0, y0, x1, y1], ...]}}, got {type(data).__name__}')
    out = {}
    for key, boxes in data.items():
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
            raise ValueError(f'{path}: boxes of {key!r} are not a list of [x0, y0, x1, y1]')
        out[str(key)] = [tuple(float(v) for v in b) for b in boxes]
    return out


def lost_discovery(
        feats: torch.Tensor,
        image_sizes: Sequence[Tuple[int, int]],
        gt_boxes: Optional[Sequence[List[Box]]] = None,
        seed: str = 'norm',
        expand: int = 100,
        progress: bool = False,
) -> Dict[str, object]:
    """Run `lost_box` on every map (N, C, h, w); boxes are scaled to each image's (W, H). With `gt_boxes`
    (per image, same pixel frame), reports CorLoc (IoU >= 0.5 with any ground-truth box)."""
    if feats.ndim != 4 or feats.shape[0] != len(image_sizes):
        raise ValueError(f'feature maps {tuple(feats.shape)} do not match {len(image_sizes)} image sizes')
    h, w = feats.shape[-2:]
    boxes, seeds = [], []
    for f, (W, H) in tqdm(list(zip(feats, image_sizes)), desc='LOST', disable=not progress, leave=False):
        (x0, y0, x1, y1), s = lost_box(f, seed, expand)
        boxes.append((x0 * W / w, y0 * H / h, x1 * W / w, y1 * H / h))
        seeds.append(s)
    out: Dict[str, object] = {'seed': seed, 'expand': expand, 'images': len(boxes), 'boxes': boxes, 'seeds': seeds}
    if gt_boxes is not None:
        if len(gt_boxes) != len(boxes):
            raise ValueError(f'{len(gt_boxes)} ground-truth box lists for {len(boxes)} images')
        out['corloc'] = corloc(boxes, gt_boxes)
        out['images_with_boxes'] = sum(1 for b in gt_boxes if b)
    else:
        out['corloc'] = math.nan
    return out
