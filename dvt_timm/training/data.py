"""Stage-1 outputs as a training set for the generalizable denoiser, and the batch order.

A stage-1 folder holds one `<image stem>.safetensors` per image, or one per view with `denoise-images
--save-views` (the format: `dvt_timm.fields.outputs`).
Files are checked at scan time from their headers alone (cheap for any folder size); a bad file is
logged with the reason and skipped. Tensors load lazily per item.

Files may come from different input sizes: items are batched only with items of the same patch grid
(`global_batches`), so no padding or resizing is needed.
"""
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from ..checkpoint import same_backbone
from ..fields.outputs import Stage1Error, Stage1Item, check_stage1

__all__ = [
    'Stage1Error', 'Stage1Item', 'Stage1Scan', 'Stage1Dataset', 'scan_stage1', 'split_files', 'global_batches', 'steps_per_epoch', 'rank_slice', 'eval_batches',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass
class Stage1Scan:
    """The result of scanning a folder: usable items (sorted by name) and skipped files with reasons."""
    items: List[Stage1Item]
    skipped: List[Tuple[Path, str]]

    @property
    def model(self) -> str:
        return self.items[0].model

    @property
    def embed_dim(self) -> int:
        return self.items[0].embed_dim

    @property
    def patch_size(self) -> int:
        return self.items[0].patch_size


def scan_stage1(root: PathLike, model: Optional[str] = None, verify: bool = False, log: bool = True) -> Stage1Scan:
    """Find and validate the stage-1 files directly in `root`.

    Every bad file is skipped with its reason (logged when `log`). The folder's backbone, width and
    patch size are those of most of its files; files of another kind are skipped as strays, so one
    stray file never aborts a run. With `model` given, the folder's backbone must be that architecture.
    With `verify`, every file is read in full and rejected if it holds NaN/Inf (slower: reads it all).

    Raises `FileNotFoundError` when `root` is not a folder, and `Stage1Error` when no usable file is
    left or the data's backbone is not `model` (naming both).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'stage-1 data folder not found: {root}')
    paths = sorted(p for p in root.glob('*.safetensors') if p.is_file() and not p.name.startswith('.'))
    items, skipped = [], []
    for path in paths:
        try:
            items.append(check_stage1(path, verify))
        except Stage1Error as e:
            skipped.append((path, str(e)))
    if items:
        kinds = Counter((i.model, i.embed_dim, i.patch_size) for i in items)
        common = kinds.most_common(1)[0][0]
        if model is not None and not same_backbone(model, common[0]):
            found = ', '.join(f'{m} ({n} files)' for (m, _, _), n in kinds.most_common())
            raise Stage1Error(
                f'--model is {model} but the stage-1 files in {root} hold features of {found}; '
                f'train with --model {common[0]} or point --data at {model} features')
        skipped += [(i.path, f'features of {i.model} with C={i.embed_dim}, patch {i.patch_size}, but the folder '
                             f'holds {common[0]} features with C={common[1]}, patch {common[2]}')
                    for i in items if (i.model, i.embed_dim, i.patch_size) != common]
        items = [i for i in items if (i.model, i.embed_dim, i.patch_size) == common]
    skipped.sort(key=lambda s: s[0].name)
    if log:
        for path, reason in skipped:
            _logger.warning('skipping stage-1 file %s: %s', path, reason)
    if not items:
        raise Stage1Error(
            f'{root}: no usable stage-1 files ({len(paths)} *.safetensors found'
            + (f', all skipped; first: {skipped[0][0].name}: {skipped[0][1]})' if skipped else ')'))
    return Stage1Scan(items=items, skipped=skipped)


def split_files(items: Sequence[Stage1Item], val_frac: float, seed: int) -> Tuple[List[Stage1Item], List[Stage1Item]]:
    """Hold out `val_frac` of the images for validation, chosen by a permutation seeded by `seed`.

    Files made from one image (the `image` they record: its views from `denoise-images --save-views`, or its
    features at several sizes) are held out together, so the held-out loss is measured on unseen images; with
    one file per image this is a split of the files. The split depends only on the (sorted) file list and the
    seed. At least one image is held out when `val_frac > 0`, and at least one is kept for training.
    """
    if not 0 <= val_frac < 1:
        raise ValueError(f'val_frac (--val-frac) must be in [0, 1), got {val_frac}')
    groups: Dict[str, List[int]] = {}  # in order of first appearance in the sorted files
    for i, it in enumerate(items):
        groups.setdefault(it.metadata.get('image', str(it.path)), []).append(i)
    keys = list(groups)
    n = len(keys)
    n_val = 0 if val_frac == 0 else min(max(round(val_frac * n), 1), n - 1)
    if val_frac > 0 and n_val == 0:
        _logger.warning('stage-1 files of one image: nothing is held out for validation')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = {i for k in perm[:n_val] for i in groups[keys[k]]}
    train = [it for i, it in enumerate(items) if i not in val_idx]
    val = [it for i, it in enumerate(items) if i in val_idx]
    return train, val


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, epoch), independent of any global RNG state.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _indices_by_grid(grids: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Item indices grouped by patch grid (a batch holds one grid), groups in sorted grid order."""
    by_grid: Dict[Tuple[int, int], List[int]] = {}
    for i, grid in enumerate(grids):
        by_grid.setdefault(tuple(grid), []).append(i)
    return [by_grid[grid] for grid in sorted(by_grid)]


def global_batches(grids: Sequence[Tuple[int, int]], batch_size: int, seed: int, epoch: int) -> List[List[int]]:
    """One epoch's global batches of dataset indices: a seeded shuffle, batched within each grid.

    Items of each grid are shuffled and cut into full batches (a grid's remainder is dropped this
    epoch; a different remainder next epoch); then the batch order is shuffled. The result depends
    only on `grids`, `batch_size`, `seed` and `epoch` -- never on the number of processes -- which is
    what makes 1-process and N-process runs, and resumed runs, see the same data.
    """
    g = _epoch_generator(seed, epoch)
    batches = []
    for idx in _indices_by_grid(grids):
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[k:k + batch_size] for k in range(0, len(perm) - batch_size + 1, batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in order]


def steps_per_epoch(grids: Sequence[Tuple[int, int]], batch_size: int) -> int:
    """Full global batches per epoch (the same every epoch)."""
    return sum(n // batch_size for n in Counter(tuple(g) for g in grids).values())


def rank_slice(batch: Sequence[int], rank: int, world_size: int) -> List[int]:
    """This rank's interleaved share of a global batch (equal sizes when the batch divides evenly)."""
    return list(batch[rank::world_size])


def eval_batches(grids: Sequence[Tuple[int, int]], batch_size: int, rank: int, world_size: int) -> List[List[int]]:
    """This rank's evaluation batches: every item exactly once over all ranks, same-grid batches."""
    batches = []
    for idx in _indices_by_grid(grids):
        batches += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    return batches[rank::world_size]


class Stage1Dataset(Dataset):
    """(raw, denoised, usable) from the files of `items`: fp32 (h, w, C) tensors read lazily, and whether the
    file could be used. A file that has become unreadable, or holds NaN/Inf (found only when read unless
    scanned with `verify`), is skipped with a warning: zeros with `usable` False, which the loss weights by 0, so
    a run goes on and keeps every batch's composition (and with it resumed and multi-process runs identical)."""

    def __init__(self, items: Sequence[Stage1Item]) -> None:
        self.items = list(items)
        self._warned: Set[Path] = set()  # per process: each DataLoader worker warns once per file

    @property
    def grids(self) -> List[Tuple[int, int]]:
        return [it.grid for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item: Stage1Item) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            with safe_open(str(item.path), framework='pt') as f:
                raw, clean = f.get_tensor('raw'), f.get_tensor('denoised')
        except (SafetensorError, OSError) as e:
            raise Stage1Error(f'unreadable ({e}), though it was valid when scanned') from e
        if raw.shape[:2] != item.grid or clean.shape != raw.shape:
            raise Stage1Error('its shapes changed on disk since the scan')
        raw, clean = raw.float(), clean.float()
        if not (raw.isfinite().all() and clean.isfinite().all()):  # it would make the loss NaN, naming nothing
            raise Stage1Error('holds NaN or Inf (--verify-data finds such files before training)')
        return raw, clean

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        item = self.items[index]
        try:
            raw, clean = self._read(item)
        except Stage1Error as e:
            if item.path not in self._warned:
                self._warned.add(item.path)
                _logger.warning('skipping stage-1 file %s: %s', item.path, e)
            raw = clean = torch.zeros(*item.grid, item.embed_dim)
            return raw, clean, torch.tensor(False)
        return raw, clean, torch.tensor(True)
