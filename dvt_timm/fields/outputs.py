"""The stage-1 output file: the contract between stage 1, stage-2 training and evaluation.

One `<image stem>.safetensors` per image with tensors `raw` (the backbone's normed last-block patch
tokens) and `denoised` (the stage-1 field F on the same grid), each (h, w, C) in fp16, bf16 or fp32,
and string metadata: `format='dvt-timm-stage1'`, `format_version`, `model` (backbone timm id),
`input_size='H,W'`, `patch_size`, plus the image, its seed and the settings.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write

__all__ = ['STAGE1_FORMAT', 'STAGE1_FORMAT_VERSION', 'Stage1Error', 'Stage1Item', 'check_stage1', 'read_stage1',
           'write_stage1']

STAGE1_FORMAT = 'dvt-timm-stage1'
STAGE1_FORMAT_VERSION = 1
_FLOAT_DTYPES = ('F16', 'BF16', 'F32')
PathLike = Union[str, os.PathLike]


class Stage1Error(ValueError):
    """A stage-1 file or folder cannot be used."""


@dataclass(frozen=True)
class Stage1Item:
    """One valid stage-1 file, described from its header."""
    path: Path
    model: str  # backbone timm id the features came from
    grid: Tuple[int, int]  # patch grid (h, w)
    embed_dim: int
    patch_size: int
    input_size: Tuple[int, int]  # (H, W) the backbone saw
    metadata: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # the whole header's


def write_stage1(path: PathLike, raw: torch.Tensor, denoised: torch.Tensor, metadata: Dict[str, object],
                 dtype: torch.dtype = torch.float16) -> None:
    """Write `raw` and `denoised` (h, w, C) with the format's metadata (others added as strings), atomically."""
    tensors = {'raw': raw.to(dtype).contiguous(), 'denoised': denoised.to(dtype).contiguous()}
    meta = {'format': STAGE1_FORMAT, 'format_version': str(STAGE1_FORMAT_VERSION)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _check(path: Path, load: bool) -> Tuple[Stage1Item, Dict[str, torch.Tensor]]:
    """The header of a valid stage-1 file, and with `load` its maps (checked to be finite), from one open."""
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if meta.get('format') != STAGE1_FORMAT:
                raise Stage1Error(f'metadata format is {meta.get("format")!r}, not {STAGE1_FORMAT!r}')
            try:
                version = int(meta.get('format_version', ''))
            except ValueError:
                raise Stage1Error(f'metadata format_version {meta.get("format_version")!r} is not an integer')
            if version > STAGE1_FORMAT_VERSION:
                raise Stage1Error(
                    f'format_version {version} is newer than this dvt-timm reads ({STAGE1_FORMAT_VERSION})')
            missing = {'raw', 'denoised'} - keys
            if missing:
                raise Stage1Error(f'missing tensors {sorted(missing)} (has {sorted(keys)})')
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in ('raw', 'denoised')}
            dtypes = {k: f.get_slice(k).get_dtype() for k in ('raw', 'denoised')}
            values = {k: f.get_tensor(k) for k in ('raw', 'denoised')} if load else {}
    except SafetensorError as e:
        raise Stage1Error(f'not a readable safetensors file ({e})') from e
    except OSError as e:
        raise Stage1Error(f'cannot be read ({e})') from e
    if not meta.get('model'):
        raise Stage1Error('metadata has no backbone "model"')
    if len(shapes['raw']) != 3 or min(shapes['raw']) < 1:
        raise Stage1Error(f'raw has shape {shapes["raw"]}, expected (h, w, C)')
    if shapes['raw'] != shapes['denoised']:
        raise Stage1Error(f'raw {shapes["raw"]} and denoised {shapes["denoised"]} differ in shape')
    bad = {k: v for k, v in dtypes.items() if v not in _FLOAT_DTYPES}
    if bad:
        raise Stage1Error(f'tensors must be fp16, bf16 or fp32, got {bad}')
    try:
        patch = int(meta['patch_size'])
    except (KeyError, ValueError):
        raise Stage1Error(f'metadata patch_size {meta.get("patch_size")!r} is not an integer')
    if patch < 1:
        raise Stage1Error(f'metadata patch_size {patch} must be positive')
    h, w, C = shapes['raw']
    size = meta.get('input_size', '')
    try:
        H, W = (int(s) for s in size.split(','))
    except ValueError:
        raise Stage1Error(f'metadata input_size {size!r} is not "H,W"')
    # Floor or ceil: stage 1 may have padded a size that is not a multiple of the patch.
    if h not in (H // patch, math.ceil(H / patch)) or w not in (W // patch, math.ceil(W / patch)):
        raise Stage1Error(f'grid {h}x{w} does not match input_size {H}x{W} at patch {patch}')
    for k, v in values.items():
        if not torch.isfinite(v).all():
            raise Stage1Error(f'{k} holds NaN or Inf values')
    item = Stage1Item(path=path, model=meta['model'], grid=(h, w), embed_dim=C, patch_size=patch, input_size=(H, W),
                      metadata=meta)
    return item, values


def check_stage1(path: PathLike, verify: bool = False) -> Stage1Item:
    """Validate a stage-1 file from its header alone (cheap for any folder size); with `verify`, also
    read its values and reject NaN/Inf. Raises `Stage1Error` with the reason (not the path)."""
    return _check(Path(path), verify)[0]


def read_stage1(path: PathLike) -> Tuple[torch.Tensor, torch.Tensor, Stage1Item]:
    """(raw, denoised, header) of a valid stage-1 file; the maps as fp32 (h, w, C).

    Raises `Stage1Error` naming the file when it is not a valid stage-1 file (NaN or Inf values included)."""
    path = Path(path)
    try:
        item, values = _check(path, load=True)
    except Stage1Error as e:
        raise Stage1Error(f'{path}: {e}') from e
    return values['raw'].float(), values['denoised'].float(), item
