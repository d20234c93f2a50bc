"""Feature sources for evaluation: a model (raw and denoised maps from one backbone pass) or a folder of
stored stage-1 outputs, held in memory as a `FeatureSet` and optionally cached on disk.

Every protocol reads a `FeatureSet`, so a run computes the backbone once and evaluates both variants.
"""
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..checkpoint import atomic_write, file_sha256
from ..data import image_to_tensor, load_image
from ..fields.outputs import Stage1Error, Stage1Item, read_stage1

__all__ = [
    'VARIANTS', 'FeatureSet', 'extract_features', 'load_stage1', 'zero_input_map', 'mean_std',
    'model_fingerprint',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
_CACHE_FORMAT = 'dvt-timm-feature-cache'
VARIANTS = ('raw', 'denoised')


@dataclass
class FeatureSet:
    """Dense features of a set of images.

    Attributes:
        names: one key per image (matched against label folders and stage-1 file stems).
        maps: variant ('raw', 'denoised') -> (N, C, h, w) float32 maps.
        image_sizes: (W, H) of each original image, or None where unknown (stored features).
        input_size: (H, W) the backbone saw.
        model: the backbone (timm id) the features come from, when known.
        reference: optional (C, h, w) raw map of an all-mean (zero) image, for `zero_input_cosine`.
        backbone_weights: what stored stage-1 files record of the backbone's weights ('pretrained' or
            'sha256:<hex>' of its checkpoint), when they do.
    """
    names: List[str]
    maps: Dict[str, torch.Tensor]
    input_size: Tuple[int, int]
    image_sizes: List[Optional[Tuple[int, int]]] = field(default_factory=list)
    model: Optional[str] = None
    reference: Optional[torch.Tensor] = None
    backbone_weights: Optional[str] = None

    def __post_init__(self) -> None:
        for variant, m in self.maps.items():
            if m.ndim != 4 or m.shape[0] != len(self.names):
                raise ValueError(f'{variant} maps have shape {tuple(m.shape)}; expected ({len(self.names)}, C, h, w)')
        if not self.image_sizes:
            self.image_sizes = [None] * len(self.names)

    @property
    def variants(self) -> List[str]:
        return list(self.maps)

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(next(iter(self.maps.values())).shape[-2:])

    def select(self, names: Sequence[str]) -> 'FeatureSet':
        """The subset (in the given order) of `names`; a missing name raises `KeyError` naming it."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f'no features for {missing[:5]}')
        idx = torch.tensor([index[n] for n in names], dtype=torch.long)
        return FeatureSet(list(names), {k: v[idx] for k, v in self.maps.items()}, self.input_size,
                          [self.image_sizes[i] for i in idx.tolist()], self.model, self.reference,
                          self.backbone_weights)


def mean_std(model: nn.Module) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation the model expects, from its (or its backbone's) pretrained cfg."""
    for m in (model, getattr(model, 'backbone', None)):
        cfg = getattr(m, 'pretrained_cfg', None) or {}
        if cfg.get('mean') and cfg.get('std'):
            return tuple(cfg['mean']), tuple(cfg['std'])
    raise ValueError(f'{type(model).__name__} has no mean/std in its pretrained_cfg; cannot normalise images')


def model_fingerprint(model: nn.Module) -> str:
    """A digest of a module's weights (names, shapes and values): the key of the on-disk cache."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f'{name}:{tuple(t.shape)}:{t.dtype}'.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _as_dvt(model: nn.Module) -> nn.Module:
    from ..model import DenoisedViT
    return model if isinstance(model, DenoisedViT) else DenoisedViT(model)


def _size_tuple(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _cache_key(path: Path) -> str:
    """A cache file name for an image: its path, readable, and a digest of the path, size and modification
    time, so that an image replaced at the same path is a new image."""
    name, stat = str(path.resolve()), path.stat()
    safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)
    return f'{safe[-80:]}-{hashlib.sha1(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]}'


def _read_maps(path: Path, expected_format: str, required: str = 'raw') -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(variant -> (C, h, w) float32, metadata) from a feature-cache file holding at least the `required`
    variant; ValueError naming the file."""
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            if meta.get('format') != expected_format:
                raise ValueError(f'format is {meta.get("format")!r}, not {expected_format!r}')
            keys = set(f.keys())
            if required not in keys:
                raise ValueError(f'has no {required!r} tensor (tensors: {sorted(keys)})')
            maps = {v: f.get_tensor(v) for v in VARIANTS if v in keys}
    except (SafetensorError, OSError, RuntimeError) as e:  # bad headers / truncation; not ValueErrors
        raise ValueError(f'{path}: not a readable safetensors file ({e})') from e
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from e
    out = {}
    for v, t in maps.items():
        if t.ndim != 3:
            raise ValueError(f'{path}: tensor {v!r} has shape {tuple(t.shape)}; expected (h, w, C)')
        out[v] = t.float().permute(2, 0, 1).contiguous()
    if len(out) == 2 and out['denoised'].shape != out['raw'].shape:
        raise ValueError(f'{path}: raw {tuple(out["raw"].shape)} and denoised {tuple(out["denoised"].shape)} differ')
    return out, meta


def _write_maps(path: Path, maps: Dict[str, torch.Tensor], meta: Dict[str, str]) -> None:
    tensors = {v: m.permute(1, 2, 0).contiguous() for v, m in maps.items()}  # stage-1 layout (h, w, C)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@torch.inference_mode()
def zero_input_map(model: nn.Module, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """The raw (C, h, w) map of an all-mean image: zeros after normalisation, so nothing but position.

    Computed on the model's device, returned on the CPU."""
    dvt = _as_dvt(model).eval()
    was = dvt.denoising
    try:
        x = torch.zeros(1, dvt.in_chans, *_size_tuple(size), device=next(dvt.parameters()).device)
        return dvt.denoise(False).feature_map(x)[0].float().cpu()
    finally:
        dvt.denoise(was)


@torch.inference_mode()
def extract_features(
        model: nn.Module,
        images: Sequence[PathLike],
        size: Union[int, Sequence[int]] = 448,
        variants: Sequence[str] = VARIANTS,
        names: Optional[Sequence[str]] = None,
        batch_size: int = 1,
        cache_dir: Optional[PathLike] = None,
        progress: bool = True,
) -> FeatureSet:
    """Squash-resize each image to `size`, run the backbone once, and keep the requested variants.

    `model` is a `DenoisedViT` (or a timm ViT, wrapped without a trained denoiser); 'denoised' comes from
    the same backbone pass as 'raw' (`raw_and_denoised`). With `cache_dir`, maps are read from / written to
    `<cache_dir>/<backbone weights digest>-<H>x<W>/<image key>.<raw | denoised-<denoiser digest>>.safetensors`
    (fp32, the stage-1 (h, w, C) layout), so a second run, or a run with another denoiser, skips the
    backbone. Unreadable images are logged and skipped. The set's `reference` is the raw zero-input map.
    The backbone runs on the model's device; the maps are returned on the CPU.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f'variants must be a non-empty subset of {VARIANTS}, got {list(variants)}')
    dvt = _as_dvt(model).eval()
    if 'denoised' in variants and dvt.denoiser is None:
        raise ValueError('the model has no denoiser, so it has no denoised variant; ask for variants=("raw",)')
    H, W = _size_tuple(size)
    if H % dvt.patch_size or W % dvt.patch_size:
        raise ValueError(f'size {H}x{W} is not a multiple of the patch size {dvt.patch_size}')
    if isinstance(images, (str, os.PathLike)):  # a str is a sequence too: of its characters
        raise TypeError(f'images must be a list of image paths, got the single path {str(images)!r}; '
                        f'pass [{str(images)!r}]')
    mean, std = mean_std(dvt)
    device = next(dvt.parameters()).device
    images = [Path(p) for p in images]
    names = list(names) if names is not None else [p.stem for p in images]
    if len(names) != len(images):
        raise ValueError(f'{len(names)} names for {len(images)} images')
    cache, tags = None, {}
    if cache_dir is not None:
        # Raw maps are keyed by the backbone's weights alone, denoised ones also by the denoiser's, so that
        # raw features are reused across denoisers.
        cache = Path(cache_dir) / f'{model_fingerprint(dvt.backbone)[:16]}-{H}x{W}'
        cache.mkdir(parents=True, exist_ok=True)
        tags = {'raw': 'raw'}
        if 'denoised' in variants:
            tags['denoised'] = f'denoised-{model_fingerprint(dvt.denoiser)[:12]}'
    meta = {'format': _CACHE_FORMAT, 'model': dvt.backbone_name, 'input_size': f'{H},{W}'}

    def cache_files(path: Path) -> Dict[str, Path]:
        key = _cache_key(path)  # once per image: it reads the file's size and modification time
        return {v: cache / f'{key}.{tags[v]}.safetensors' for v in variants}

    kept: List[int] = []
    sizes: List[Tuple[int, int]] = []
    out: Dict[str, List[torch.Tensor]] = {v: [] for v in variants}
    todo: List[Tuple[int, Optional[Dict[str, Path]], torch.Tensor]] = []  # (slot in the output, cache files, input)

    def flush() -> None:
        if not todo:
            return
        x = torch.stack([t for _, _, t in todo]).to(device)
        if 'denoised' in variants:
            raw, clean = dvt.raw_and_denoised(x)
            maps = {'raw': raw, 'denoised': clean}
        else:
            was = dvt.denoising
            try:
                maps = {'raw': dvt.denoise(False).feature_map(x)}
            finally:
                dvt.denoise(was)
        maps = {v: m.float().cpu() for v, m in maps.items()}  # the set lives on the CPU, as cached maps are read
        for j, (slot, files, _) in enumerate(todo):
            for v in variants:
                out[v][slot] = maps[v][j]
                if files is not None:
                    _write_maps(files[v], {v: maps[v][j]}, meta)
        todo.clear()

    for i, path in enumerate(tqdm(images, desc='features', disable=not progress)):
        try:
            img = load_image(path)
        except ValueError as e:
            _logger.warning('skipping %s', e)
            continue
        kept.append(i)
        sizes.append(img.size)
        for v in variants:
            out[v].append(None)
        files = cache_files(path) if cache is not None else None
        if files is not None and all(f.is_file() for f in files.values()):
            try:
                for v in variants:
                    out[v][-1] = _read_maps(files[v], _CACHE_FORMAT, required=v)[0][v]
                continue
            except ValueError as e:
                _logger.warning('recomputing: %s', e)
        todo.append((len(kept) - 1, files, image_to_tensor(img, (H, W), mean, std)))
        if len(todo) >= batch_size:
            flush()
    flush()
    if not kept:
        raise ValueError('none of the images could be read')
    return FeatureSet(
        names=[names[i] for i in kept], maps={v: torch.stack(out[v]) for v in variants}, input_size=(H, W),
        image_sizes=sizes, model=dvt.backbone_name or None, reference=zero_input_map(dvt, (H, W)))


def load_stage1(
        folder: PathLike,
        names: Optional[Sequence[str]] = None,
        images: Optional[Sequence[PathLike]] = None,
) -> FeatureSet:
    """Read stored stage-1 outputs (`<image stem>.safetensors` with `raw` and `denoised` (h, w, C) tensors
    and metadata format 'dvt-timm-stage1').

    With `names`, the files `<Path(name).name>.safetensors` are read in that order (missing or malformed
    ones are logged and skipped); otherwise every file in the folder. With `images` (one per name), a file
    made from another picture than its image (the SHA-256 it records) is logged and skipped. The set is the
    files of the most common backbone, weights, width and input size (the first file's on a tie); a stray
    file of another kind is logged and skipped, as `train-denoiser` does.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'no stage-1 feature folder at {folder}')
    if names is None:
        files = sorted(folder.glob('*.safetensors'))
        names = [p.stem for p in files]
    else:
        files = [folder / f'{Path(n).name}.safetensors' for n in names]
    if images is not None and len(images) != len(names):
        raise ValueError(f'{len(images)} images for {len(names)} names')
    read = []
    for i, (name, path) in enumerate(zip(names, files)):
        if not path.is_file():
            _logger.warning('skipping %s: no stage-1 file %s', name, path)
            continue
        try:
            raw, denoised, item = read_stage1(path)
        except Stage1Error as e:
            _logger.warning('skipping %s', e)
            continue
        recorded = item.metadata.get('image_sha256')
        if images is not None and recorded and recorded != file_sha256(images[i]):
            _logger.warning('skipping %s: made from another picture (%s) than %s', path, item.metadata.get('image'),
                            images[i])
            continue
        read.append((name, raw, denoised, item))
    if not read:
        raise ValueError(f'{folder}: no readable stage-1 files' + (' for the given images' if names else ''))
    # Maps of one set are stacked and compared, so they must share backbone, width and grid.
    kinds = Counter(_stage1_kind(item) for *_, item in read)
    common = kinds.most_common(1)[0][0]  # ties go to the first file's kind
    kept, maps, first = [], {v: [] for v in VARIANTS}, None
    for name, raw, denoised, item in read:
        if _stage1_kind(item) != common:
            _logger.warning('skipping %s: features of %s differ from those of most files, %s; evaluate one '
                            'backbone and input size at a time', item.path, _stage1_kind(item), common)
            continue
        first = first or item
        kept.append(name)
        maps['raw'].append(raw.permute(2, 0, 1))
        maps['denoised'].append(denoised.permute(2, 0, 1))
    return FeatureSet(names=kept, maps={v: torch.stack(m) for v, m in maps.items()}, input_size=first.input_size,
                      model=first.model, backbone_weights=first.metadata.get('backbone_weights'))


def _stage1_kind(item: Stage1Item) -> str:
    """What stage-1 files must share to be evaluated together, in words."""
    (H, W), (h, w) = item.input_size, item.grid
    weights = item.metadata.get('backbone_weights')
    return (f'{item.model}{f" (weights {weights[:19]})" if weights else ""} ({item.embed_dim} channels, '
            f'{H}x{W} input, {h}x{w} grid)')
