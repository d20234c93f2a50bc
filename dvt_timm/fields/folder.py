"""Stage 1 over an image folder: one `<stem>.safetensors` per image, atomic, resumable, shardable.

Images are taken in sorted order in fixed groups of `batch_images`, whose fields are optimised
together. The grouping never depends on what is already done, so a resumed run recomputes a
half-written group whole and its results are bit-identical to an uninterrupted run's on the CPU (on a GPU
the kernels' atomic adds leave float-rounding differences between runs). Under `torchrun`
rank r takes groups r, r + W, r + 2W, ...; ranks share nothing, so one GPU per rank on any number of
nodes works without a scheduler of ours.
"""
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from tqdm import tqdm

from ..checkpoint import file_sha256, with_default_tag
from ..data import load_image, unique_stems
from .decomposition import Decomposition, FieldSettings, image_seed
from .outputs import Stage1Error, check_stage1, write_stage1
from .pipeline import denoise_images

__all__ = ['FolderSummary', 'denoise_folder', 'output_path', 'rank_world', 'view_path', 'views_dir', 'visuals_dir']

_logger = logging.getLogger(__name__)


@dataclass
class FolderSummary:
    done: int = 0  # computed and written in this run
    skipped: int = 0  # already present from an earlier run
    failed: List[str] = field(default_factory=list)  # 'path: reason'
    seconds: float = 0.0

    def __str__(self) -> str:
        per = f'{self.seconds / self.done:.1f} s/image' if self.done else 'n/a s/image'
        return f'{self.done} done, {self.skipped} skipped (already done), {len(self.failed)} failed, {per}'


def output_path(out_dir: Path, image: Path) -> Path:
    return out_dir / f'{image.stem}.safetensors'


def visuals_dir(out_dir: Path) -> Path:
    """Where `--save-visuals` PNGs go: a subfolder, so they can never overwrite an input image."""
    return out_dir / 'visuals'


def views_dir(out_dir: Path) -> Path:
    """Where `--save-views` writes each view's (raw, F) pair: a stage-1 folder of its own, for `train-denoiser`."""
    return out_dir / 'views'


def view_path(out_dir: Path, image: Path, view: int) -> Path:
    return views_dir(out_dir) / f'{image.stem}_view{view:03d}.safetensors'


# Settings added after outputs were first written, with the value those older outputs were made with.
_SETTINGS_BEFORE_THEY_EXISTED = {'sparse_table_adam': False}
# Metadata entries not always recorded (older outputs, API callers): an output without one is not checked on it.
_OPTIONAL_ENTRIES = ('backbone_weights',)


def _comparable(key: str, value: Optional[str]) -> Optional[str]:
    # `--model dvt_vit_small_patch14_dinov2` records vit_small_patch14_dinov2.lvd142m; a re-run naming the
    # backbone itself, without its default tag, is the same model.
    if key == 'model' and value:
        return with_default_tag(value)
    if key == 'settings' and value:  # an older output lacks the newer settings: it was made without them
        try:
            settings = json.loads(value)
        except ValueError:
            return value
        if isinstance(settings, dict):
            return json.dumps({**_SETTINGS_BEFORE_THEY_EXISTED, **settings}, sort_keys=True)
    return value


def _finished(path: Path, expected: Dict[str, str], image: Path) -> bool:
    """Whether an existing output is finished work of this run: False (logged, redone) for an unreadable
    file; an error for one made with other settings or backbone weights, or from another picture of the same
    name, which a resumed run must not mix in."""
    try:
        meta = check_stage1(path).metadata
    except Stage1Error as e:
        _logger.warning('redoing %s: %s', path, e)
        return False
    differ = sorted(k for k, v in expected.items() if _comparable(k, meta.get(k)) != _comparable(k, v)
                    and not (k in _OPTIONAL_ENTRIES and k not in meta))
    if differ:
        changes = '; '.join(_difference(k, meta.get(k), expected[k]) for k in differ)
        raise ValueError(f'{path} was made with other settings than this run ({changes}); use another output '
                         'folder, or delete the file to redo it')
    if 'image_sha256' in meta and meta['image_sha256'] != file_sha256(image):
        raise ValueError(f'{path} was made from another picture ({meta.get("image")}) than {image}, which has the '
                         'same name; use another output folder, or delete the file to redo it')
    return True


def _difference(key: str, theirs: Optional[str], ours: str) -> str:
    """One differing metadata entry in words; for the settings JSON, each field that differs."""
    if key == 'settings':
        try:
            a, b = json.loads(_comparable(key, theirs) or '{}'), json.loads(_comparable(key, ours))
        except ValueError:  # unreadable settings: named as a whole below
            a = b = None
        if isinstance(a, dict) and isinstance(b, dict):
            return ', '.join(f'{k} {a.get(k)!r}, now {b.get(k)!r}' for k in sorted(set(a) | set(b))
                             if a.get(k) != b.get(k))
    return f'{key} {theirs!r}, now {ours!r}'


def rank_world() -> Tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def _remove_stale_temps(out_dir: Path, images: Sequence[Path]) -> None:
    """Drop temp files a killed run left behind, of features, visuals and views (only this rank's images: other
    ranks may be writing)."""
    mine = {name for p in images for name in (output_path(out_dir, p).name, f'{p.stem}.png')}
    for tmp in [*out_dir.glob('.*.tmp'), *visuals_dir(out_dir).glob('.*.tmp')]:
        if any(tmp.name.startswith(f'.{name}.') for name in mine):
            tmp.unlink(missing_ok=True)
    stems = {p.stem for p in images}
    for tmp in views_dir(out_dir).glob('.*_view*.tmp'):  # .<stem>_viewNNN.safetensors.<random>.tmp
        if tmp.name[1:].rsplit('_view', 1)[0] in stems:
            tmp.unlink(missing_ok=True)


def denoise_folder(
        model: torch.nn.Module,
        images: Sequence[Path],
        out_dir: Path,
        settings: FieldSettings,
        model_name: str,
        batch_images: int = 4,
        dtype: torch.dtype = torch.float16,
        device: Optional[torch.device] = None,
        backend: str = 'auto',
        visuals: Optional[Callable[[Image.Image, Path, Decomposition], None]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        backbone_weights: Optional[str] = None,
        save_views: bool = False,
) -> FolderSummary:
    """Run stage 1 on this rank's share of `images`, writing `out_dir/<stem>.safetensors` per image.

    `visuals(image, png_path, result)`, if given, writes a PNG per image to `visuals_dir(out_dir)`.
    With `save_views`, every view's raw features and F at its coordinates go to `view_path(out_dir, image, v)`
    too (v = 0 is the full image), before the image's own file; an image whose views are missing is redone.
    `backbone_weights` says which weights `model_name` has: 'pretrained' (timm's), or 'sha256:<hex>' of the
    checkpoint file loaded (`file_sha256`); None records nothing. Existing outputs count as done when they were
    made from the same image file with the same model, weights (where both runs record them), input size and
    settings (else the run stops before computing anything); unreadable ones are redone.
    """
    unique_stems(images)  # a stem names the image's output file; checked before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if save_views:
        views_dir(out_dir).mkdir(exist_ok=True)
    if rank is None or world_size is None:
        rank, world_size = rank_world()
    groups = [list(images[k:k + batch_images]) for k in range(0, len(images), batch_images)]
    mine = groups[rank::world_size]
    _remove_stale_temps(out_dir, [p for g in mine for p in g])
    expected = {'model': model_name, 'input_size': f'{settings.image_size},{settings.image_size}',
                'settings': json.dumps(asdict(settings), sort_keys=True)}
    if backbone_weights is not None:
        expected['backbone_weights'] = backbone_weights
    last_view = settings.n_views  # views are written in order, each atomically: the last one means all
    finished = {p for g in mine for p in g
                if output_path(out_dir, p).exists() and _finished(output_path(out_dir, p), expected, p)
                and (not save_views or view_path(out_dir, p, last_view).exists())}

    summary = FolderSummary()
    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, mine)), desc=f'stage 1 [rank {rank}/{world_size}]' if world_size > 1 else 'stage 1',
               unit='img', dynamic_ncols=True)
    for group in mine:
        todo = [p for p in group if p not in finished]
        summary.skipped += len(group) - len(todo)
        bar.update(len(group) - len(todo))
        if not todo:
            continue
        loaded, paths = [], []
        for p in group:  # the whole group, done ones too: the grouping fixes the numerics
            try:
                loaded.append(load_image(p))
                paths.append(p)
            except ValueError as e:
                summary.failed.append(str(e))
                _logger.warning('skipping %s', e)
                bar.update(1)
        if not set(paths) - finished:  # the group's only unfinished images are unreadable ones
            continue

        def progress(stage: str, value: int) -> None:
            bar.set_postfix_str(f'{stage} {value}/{settings.iterations}' if stage == 'optimise' else stage)

        results = denoise_images(model, loaded, settings, keys=[p.stem for p in paths], device=device,
                                 backend=backend, progress=progress, keep_views=save_views)
        for p, image, result in zip(paths, loaded, results):
            if p in finished:
                continue
            if not (result.raw.isfinite().all() and result.denoised.isfinite().all()):
                # Never written: a file marks the image done, and stage 2 would refuse it later.
                summary.failed.append(f'{p}: stage 1 gave NaN or Inf features (diverged; try a lower --lr)')
                _logger.warning('skipping %s', summary.failed[-1])
                bar.update(1)
                continue
            out = output_path(out_dir, p)
            meta = {**expected, 'patch_size': str(settings.image_size // result.raw.shape[0]), 'image': str(p),
                    'image_sha256': file_sha256(p), 'image_seed': str(image_seed(settings.seed, p.stem))}
            if visuals is not None:  # before the features: their file is what marks the image done
                visuals(image, visuals_dir(out_dir) / f'{p.stem}.png', result)
            if save_views:
                for v, (raw, denoised) in enumerate(zip(result.view_raw, result.view_denoised)):
                    write_stage1(view_path(out_dir, p, v), raw, denoised, {**meta, 'view': str(v)}, dtype)
            write_stage1(out, result.raw, result.denoised, meta, dtype)
            summary.done += 1
            bar.update(1)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
