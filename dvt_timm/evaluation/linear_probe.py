"""Linear probe: a 1x1 convolution on frozen dense features, trained with cross-entropy."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .knn import query_split
from .labels import IGNORE
from .scores import ConfusionMatrix, upsample_argmax
from .threads import single_thread

__all__ = ['linear_probe', 'fold_splits', 'probe_splits']


def _resize_labels(labels: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of label maps to one size (N, H, W); -1 (ignore) survives."""
    return torch.stack([F.interpolate(lab[None, None].float(), size=size, mode='nearest')[0, 0].long()
                        for lab in labels])


def fold_splits(n: int, folds: int, seed: int) -> List[Tuple[List[int], List[int]]]:
    """(test images, training images) of each of `folds` cross-validation folds: a seeded permutation cut
    into `folds` near-equal groups, each group tested once."""
    if not 2 <= folds <= n:
        raise ValueError(f'folds must be in [2, {n}] for {n} images, got {folds}')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    groups = [sorted(g.tolist()) for g in perm.tensor_split(folds)]
    return [(test, sorted(set(range(n)) - set(test))) for test in groups]


def probe_splits(n: int, holdout: float, folds: Optional[int], seed: int) -> List[Tuple[List[int], List[int]]]:
    """The probe's (test images, training images) pairs: `folds` cross-validation folds, else one held-out split."""
    return fold_splits(n, folds, seed) if folds is not None else [query_split(n, holdout, seed)]


def _train_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, lr: float, weight_decay: float,
                batch_size: int, g: torch.Generator, progress: bool) -> Tuple[nn.Conv2d, float]:
    """AdamW with a cosine decay on (N, C, h, w) standardised maps and (N, H, W) labels; (head, last loss)."""
    head = nn.Conv2d(x.shape[1], num_classes, 1)
    with torch.no_grad():  # timm-style init from our own generator, so the global RNG is left alone
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batches: list = []
    loss = torch.tensor(math.nan)
    size = tuple(y.shape[-2:])
    small = min(batch_size, len(x)) * num_classes * size[0] * size[1] < 2 ** 20  # logits per step
    with single_thread(small):
        for _ in tqdm(range(steps), desc='linear probe', disable=not progress, leave=False):
            if not batches:
                batches = list(torch.randperm(len(x), generator=g).split(batch_size))
            batch = batches.pop(0)
            logits = F.interpolate(head(x[batch]), size=size, mode='bilinear', align_corners=False)
            loss = F.cross_entropy(logits, y[batch], ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):  # not a batch of only ignored pixels
                loss.backward()
                opt.step()
            sched.step()
    return head, loss.item()


def linear_probe(
        feats: torch.Tensor,
        labels: Sequence[torch.Tensor],
        num_classes: int,
        holdout: float = 0.25,
        seed: int = 0,
        steps: int = 500,
        lr: float = 3e-2,
        weight_decay: float = 1e-4,
        batch_size: int = 8,
        train_label_size: Optional[Tuple[int, int]] = None,
        class_names: Optional[Sequence[str]] = None,
        folds: Optional[int] = None,
        progress: bool = False,
        per_image: bool = False,
) -> Dict[str, object]:
    """Train a 1x1 conv on (N, C, h, w) maps of the training split; report mIoU / mAcc on the held-out split.

    Features are standardised per channel with training-split statistics (the role of the BatchNorm in
    DINOv2's linear head). Logits are upsampled bilinearly to the label size: during training to
    `train_label_size` (default 4x the patch grid, with labels resized by nearest neighbour, to keep a CPU
    step short), at test time to each label's own full size. `steps` AdamW steps on batches of
    `batch_size` training images (a fresh shuffle each pass), with a cosine learning-rate decay; a fixed
    step count keeps small and large sets comparably trained. The split, the initialisation and the batch
    order all follow `seed`.

    With `folds`, K-fold cross-validation replaces the single held-out split: one probe per fold, and one
    confusion matrix over every fold's test images, so each image is scored once. On a set of a dozen
    images a held-out quarter is three or four images, and its mIoU swings with which ones they are.

    With `per_image`, each test image's confusion matrix is returned too, `image_matrices` (N_test, K, K), for
    `scores.bootstrap_miou`.
    """
    if feats.ndim != 4 or feats.shape[0] != len(labels):
        raise ValueError(f'feature maps {tuple(feats.shape)} do not match {len(labels)} labels')
    splits = probe_splits(len(labels), holdout, folds, seed)
    h, w = feats.shape[-2:]
    size = tuple(train_label_size) if train_label_size is not None else (4 * h, 4 * w)
    g = torch.Generator().manual_seed(seed)
    cm = ConfusionMatrix(num_classes, keep_images=per_image)
    losses = []
    for test_idx, train_idx in splits:
        x_train = feats[train_idx].float().clone()  # clone: the maps may be inference tensors
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        y_train = _resize_labels([labels[i] for i in train_idx], size)
        if not bool((y_train != IGNORE).any()):
            raise ValueError('the training split has no labelled pixels')
        head, loss = _train_head((x_train - mean) / std, y_train, num_classes, steps, lr, weight_decay,
                                 batch_size, g, progress)
        losses.append(loss)
        with torch.no_grad():
            for i in test_idx:
                logits = head((feats[i:i + 1].float() - mean) / std)[0]
                cm.update(upsample_argmax(logits, labels[i].shape), labels[i])
    out = cm.scores(class_names)
    # The first fold tests the largest group (tensor_split), so its training split is the smallest.
    train_images, test_images = len(splits[0][1]), sum(len(test) for test, _ in splits)
    out.update({
        'split': f'{folds}-fold (seed {seed})' if folds is not None else f'holdout {holdout} (seed {seed})',
        'train_images': train_images, 'test_images': test_images, 'steps': steps, 'batch_size': batch_size,
        'lr': lr, 'train_label_size': list(size), 'final_train_loss': sum(losses) / len(losses),
    })
    if per_image:
        out['image_matrices'] = cm.image_matrices()
    return out
