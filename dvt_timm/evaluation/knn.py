"""Non-parametric (kNN) segmentation of frozen dense features.

`centroid` mode follows DVT's Tab. 5 protocol as this project implements it: a memory bank holds one entry per
(bank image, class present in it) - the masked average of that image's features over the class's pixels -
and every query patch takes the 20 nearest entries by cosine similarity. `patch` mode keeps every labelled
patch of the bank images instead. See docs/evaluation.md for the exact choices.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .labels import IGNORE
from .scores import ConfusionMatrix, upsample_argmax

__all__ = ['patch_class_counts', 'query_split', 'knn_segmentation']


def patch_class_counts(label: torch.Tensor, grid: Tuple[int, int], num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixels of each class under each patch: `(counts (h*w, K), pixels (h*w,))`.

    A label pixel (y, x) of an H x W label belongs to patch (y*h//H, x*w//W): the squash-resize maps the
    whole label onto the whole patch grid. `pixels` counts all pixels of the patch, ignored ones included.
    """
    H, W = label.shape
    h, w = grid
    pid = ((torch.arange(H) * h // H)[:, None] * w + (torch.arange(W) * w // W)[None, :]).flatten()
    lab = label.flatten().long()
    valid = lab != IGNORE
    counts = torch.bincount(pid[valid] * num_classes + lab[valid], minlength=h * w * num_classes)
    return counts.view(h * w, num_classes).float(), torch.bincount(pid, minlength=h * w).float()


def query_split(n: int, holdout: Optional[float], seed: int) -> Tuple[List[int], Optional[List[int]]]:
    """(query images, bank images). `holdout=None` is leave-one-image-out: every image is a query and its
    bank is all the others (bank None). A fraction holds out that share of images (at least one) as
    queries, chosen by a seeded permutation, and banks the rest."""
    if holdout is None:
        return list(range(n)), None
    if not 0 < holdout < 1:
        raise ValueError(f'holdout must be a fraction in (0, 1), got {holdout}')
    n_query = min(n - 1, max(1, math.ceil(holdout * n)))
    if n_query < 1:
        raise ValueError(f'a held-out split needs at least 2 images, got {n}')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:n_query]), sorted(perm[n_query:])


def _bank(feats: torch.Tensor, counts: List[Tuple[torch.Tensor, torch.Tensor]], mode: str,
          min_coverage: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entries (M, C) unit-norm, class (M,), image (M,)) for every image."""
    entries, classes, owners = [], [], []
    for i, (f, (cnt, pixels)) in enumerate(zip(feats.flatten(2).transpose(1, 2), counts)):
        if mode == 'centroid':
            mass = cnt.sum(0)
            present = (mass > 0).nonzero()[:, 0]
            # Masked average pooling: each patch weighs in with the number of the class's pixels under it.
            cent = (cnt[:, present].T @ f) / mass[present, None]
            entries.append(cent)
            classes.append(present)
        else:
            best, cls = cnt.max(1)
            keep = (best > 0) & (cnt.sum(1) >= min_coverage * pixels)
            entries.append(f[keep])
            classes.append(cls[keep])
        owners.append(torch.full((len(classes[-1]),), i, dtype=torch.long))
    return F.normalize(torch.cat(entries), dim=1), torch.cat(classes), torch.cat(owners)


def _topk_votes(query: torch.Tensor, bank: torch.Tensor, bank_cls: torch.Tensor, allowed: torch.Tensor,
                k: int, temperature: float, num_classes: int, chunk: int = 16384) -> torch.Tensor:
    """Per query row, class votes (n, K) from its k most similar allowed bank entries, each weighted by
    exp(cos / temperature) and normalised to sum to 1 (so upsampling mixes probabilities)."""
    n = query.shape[0]
    top_s = torch.full((n, 0), float('-inf'))
    top_i = torch.zeros((n, 0), dtype=torch.long)
    for start in range(0, bank.shape[0], chunk):  # running top-k keeps memory at n x chunk
        sim = query @ bank[start:start + chunk].T
        sim = sim.masked_fill(~allowed[start:start + chunk][None], float('-inf'))
        s, i = torch.cat([top_s, sim], 1), torch.cat([top_i, torch.arange(start, start + sim.shape[1]).expand(n, -1)], 1)
        top_s, idx = s.topk(min(k, s.shape[1]), dim=1)
        top_i = i.gather(1, idx)
    weights = torch.exp((top_s - 1) / temperature).masked_fill(torch.isinf(top_s), 0)  # shift by the max cos, 1
    votes = torch.zeros(n, num_classes).scatter_add_(1, bank_cls[top_i], weights)
    return votes / votes.sum(1, keepdim=True).clamp_min(1e-30)


def knn_segmentation(
        feats: torch.Tensor,
        labels: Sequence[torch.Tensor],
        num_classes: int,
        k: int = 20,
        temperature: float = 0.07,
        mode: str = 'centroid',
        holdout: Optional[float] = None,
        seed: int = 0,
        min_coverage: float = 0.5,
        class_names: Optional[Sequence[str]] = None,
        progress: bool = False,
        per_image: bool = False,
) -> Dict[str, object]:
    """kNN segmentation of feature maps (N, C, h, w) against labels [(H_i, W_i)] (ids 0..K-1, -1 ignored).

    Args:
        k: neighbours per query patch (DVT: 20).
        temperature: votes are weighted by exp(cos / temperature) (0.07, as in DINO's kNN classifier).
        mode: 'centroid' (bank of per-image class centroids) or 'patch' (bank of labelled patches, a patch
            taking the majority class of its labelled pixels when they cover >= `min_coverage` of it).
        holdout: None for leave-one-image-out, or the fraction of images held out as queries (`seed`).
        per_image: also return each query image's confusion matrix, `image_matrices` (Q, K, K), for
            `scores.bootstrap_miou`.

    Each query patch's normalised class votes are upsampled bilinearly to the label size, and the argmax is
    scored there. Returns mIoU, mAcc, pixel accuracy, per-class IoU and the set-up.
    """
    if mode not in ('centroid', 'patch'):
        raise ValueError(f"mode must be 'centroid' or 'patch', got {mode!r}")
    if feats.ndim != 4 or feats.shape[0] != len(labels):
        raise ValueError(f'feature maps {tuple(feats.shape)} do not match {len(labels)} labels')
    if len(labels) < 2:
        raise ValueError('kNN segmentation needs at least 2 labelled images')
    grid = tuple(feats.shape[-2:])
    feats = feats.float()
    counts = [patch_class_counts(lab, grid, num_classes) for lab in labels]
    bank, bank_cls, bank_img = _bank(feats, counts, mode, min_coverage)
    queries, banked = query_split(len(labels), holdout, seed)
    in_bank = torch.ones(len(labels), dtype=torch.bool)
    if banked is not None:
        in_bank[:] = False
        in_bank[banked] = True
    cm = ConfusionMatrix(num_classes, keep_images=per_image)
    sizes = []
    for i in tqdm(queries, desc=f'kNN ({mode})', disable=not progress, leave=False):
        allowed = in_bank[bank_img] & (bank_img != i)
        sizes.append(int(allowed.sum()))
        if sizes[-1] == 0:
            raise ValueError(f'image {i} has an empty memory bank (no labelled pixels in the other images)')
        q = F.normalize(feats[i].flatten(1).T, dim=1)
        votes = _topk_votes(q, bank, bank_cls, allowed, k, temperature, num_classes)
        used = (votes.sum(0) > 0).nonzero()[:, 0]  # upsample only the classes that got votes
        score_maps = votes[:, used].T.reshape(len(used), *grid)
        cm.update(used[upsample_argmax(score_maps, labels[i].shape)], labels[i])
    out = cm.scores(class_names)
    out.update({
        'mode': mode, 'k': k, 'temperature': temperature,
        'split': 'leave-one-image-out' if holdout is None else f'holdout {holdout} (seed {seed})',
        'queries': len(queries), 'bank_entries_mean': sum(sizes) / len(sizes),
    })
    if per_image:
        out['image_matrices'] = cm.image_matrices()
    return out
