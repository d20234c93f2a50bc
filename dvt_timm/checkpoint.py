"""Checkpoint files: safe loading, the authors' `.pth` format and ours (config.json + model.safetensors).

Our format is a directory (or Hub repo) with `config.json` describing the denoiser and the backbone it
was trained for, and `model.safetensors` holding the denoiser weights only (`pos_embed`, `block.*`).
The authors' files (Hub repo `jjiaweiyang/DVT`) are pickled dicts whose `"denoiser"` entry holds
`pos_embed` and `denoiser.*`; they are read with `torch.load(weights_only=True)` and renamed on the fly.
"""
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import timm
import torch
from safetensors.torch import load_file, save_file

from .denoiser import default_num_heads

__all__ = [
    'CheckpointError', 'DenoiserConfig', 'load_state_dict_file', 'read_denoiser_checkpoint', 'read_denoiser_config',
    'write_denoiser_checkpoint', 'backbone_arch', 'with_default_tag', 'same_backbone', 'file_sha256',
    'backbone_weights_id', 'atomic_write', 'weights_path', 'refuse_to_replace',
]

FORMAT_VERSION = 1
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'  # the model card beside them
# The Hub metadata that heads the model cards our commands write (training, averaging).
CARD_FRONT_MATTER = """---
library_name: dvt-timm
tags:
- dvt
- timm
- image-feature-extraction
- vision-transformer
---
"""
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt, or does not fit the model."""


@dataclass
class DenoiserConfig:
    """What `config.json` records about a denoiser in our format."""
    backbone: str  # timm id of the backbone the denoiser was trained on, with tag when known
    embed_dim: int
    num_heads: int
    grid_size: int  # side K of the learned position embedding
    patch_size: int
    input_size: Optional[int] = None  # side of the square images it was trained on; None: DVT's 518 / 512
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict, source: str = 'config') -> 'DenoiserConfig':
        if not isinstance(data, dict):
            raise CheckpointError(f'{source}: expected a JSON object, got a {type(data).__name__}')
        names = {f.name for f in fields(cls)}
        missing = {'backbone', 'embed_dim', 'num_heads', 'grid_size', 'patch_size'} - set(data)
        if missing:
            raise CheckpointError(f'{source}: missing keys {sorted(missing)}')
        if not isinstance(data['backbone'], str):
            raise CheckpointError(f'{source}: backbone must be a timm model name, got {data["backbone"]!r}')
        for key in ('embed_dim', 'num_heads', 'grid_size', 'patch_size', 'format_version'):
            value = data.get(key, FORMAT_VERSION)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise CheckpointError(f'{source}: {key} must be a positive integer, got {value!r}')
        if data.get('format_version', FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(
                f'{source}: format_version {data["format_version"]} is newer than this dvt-timm '
                f'supports ({FORMAT_VERSION}); upgrade dvt-timm')
        cfg = cls(**{k: v for k, v in data.items() if k in names})
        size = cfg.input_size
        if size is not None and not (isinstance(size, int) and size > 0 and size % cfg.patch_size == 0):
            raise CheckpointError(f'{source}: input_size {size!r} is not a positive multiple of the patch size '
                                  f'{cfg.patch_size}')
        return cfg

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def backbone_arch(name: str) -> str:
    """The architecture part of a timm model id: 'vit_small_patch14_dinov2.lvd142m' -> 'vit_small_patch14_dinov2'."""
    return name.split('.', 1)[0]


def with_default_tag(name: str) -> str:
    """A timm model id with timm's default pretrained tag filled in when it has none:
    'vit_small_patch14_dinov2' -> 'vit_small_patch14_dinov2.lvd142m' (the same weights under both names)."""
    if '.' in name:
        return name
    cfg = timm.models.get_pretrained_cfg(name)
    return f'{name}.{cfg.tag}' if cfg is not None and cfg.tag else name


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_weights_id(checkpoint: Optional[PathLike], pretrained: bool = True) -> Optional[str]:
    """What stage-1 outputs record of a backbone's weights: 'sha256:<hex>' of its checkpoint file, 'pretrained'
    for timm's weights, or None for random ones."""
    if checkpoint is not None:
        return f'sha256:{file_sha256(checkpoint)}'
    return 'pretrained' if pretrained else None


def same_backbone(a: str, b: str) -> bool:
    """Whether two timm ids name the same weights: the same architecture and tag, a missing tag being timm's
    default ('vit_base_patch16_224.mae' and '.dino' differ; 'vit_small_patch14_dinov2' is '.lvd142m')."""
    return with_default_tag(a) == with_default_tag(b)


def atomic_write(path: PathLike, write_fn) -> None:
    """Call `write_fn(tmp_path)` and move the result to `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, 'rb') as f:  # on disk before the rename, so that a crash cannot leave `path` empty
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def short_cause(e: Exception) -> str:
    """One line of a loading error. torch's weights_only refusal is a page that suggests weights_only=False
    or allowlisting, which we never do: keep only its reason (the global it refused)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith('Weights only load failed'):
        reason = next((line for line in lines if 'GLOBAL' in line), lines[-1])
        return reason.split('WeightsUnpickler error:', 1)[-1].split(' Please use', 1)[0].strip()[:200]
    return lines[0][:200] if lines else ''


def load_state_dict_file(path: PathLike) -> Dict[str, object]:
    """Load a `.safetensors` file, or a `.pth`/`.pt` file with `torch.load(weights_only=True)`.

    Raises `FileNotFoundError` for a missing file and `CheckpointError` naming the file when it is
    corrupt, truncated, or holds pickled objects other than tensors and containers.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'{path} is a folder; give the checkpoint file (.safetensors or .pth)')
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        if path.suffix == '.safetensors':
            return load_file(str(path), device='cpu')
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # SafetensorError, UnpicklingError, EOFError, a KeyError on bytes that are no pickle, ...
        cause = short_cause(e)
        raise CheckpointError(f'{path}: not a checkpoint that can be read safely: truncated or corrupt, another kind of '
                              f'file, or a pickle holding objects other than tensors ({type(e).__name__}: {cause})') from e
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state dict (names mapped to tensors)')
    return obj


def _refuse_backbone(sd: Dict[str, object], path: Path) -> None:
    """A ViT's own weights given where a denoiser belongs: say so, rather than fail on their shapes."""
    for key in ('state_dict', 'model'):  # as training scripts wrap them
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    top = {k.removeprefix('module.').removeprefix('model.').split('.', 1)[0] for k in sd}
    if {'backbone', 'denoiser'} <= top:
        raise CheckpointError(f'{path}: holds a whole DenoisedViT state dict (backbone.*, denoiser.*), not a denoiser '
                              'alone; load it with timm.create_model(..., checkpoint_path=...) or '
                              'model.load_state_dict (save_pretrained writes the denoiser alone)')
    if {'patch_embed', 'blocks'} <= top:
        raise CheckpointError(f'{path}: holds backbone weights (patch_embed, blocks), not a denoiser; pass it as '
                              'backbone_checkpoint (CLI: --backbone-checkpoint)')


def _from_authors(obj: Dict[str, object], path: Path) -> Dict[str, torch.Tensor]:
    """Rename an authors' denoiser dict (`pos_embed`, `denoiser.*`) to ours (`pos_embed`, `block.*`); a `.pth`
    of our own layout (`torch.save(model.denoiser.state_dict())`) passes unchanged."""
    sd = obj.get('denoiser', obj) if isinstance(obj, dict) else None
    if isinstance(sd, dict):
        _refuse_backbone(sd, path)
    if not isinstance(sd, dict) or 'pos_embed' not in sd:
        raise CheckpointError(f'{path}: not a DVT denoiser checkpoint (no "denoiser" entry with "pos_embed")')
    out = {}
    for k, v in sd.items():
        if k == 'pos_embed' or k.startswith('block.'):
            out[k] = v
        elif k.startswith('denoiser.'):
            out['block.' + k[len('denoiser.'):]] = v
        elif not k.startswith('vit.'):  # a bundled backbone copy is ignored; the backbone loads separately
            raise CheckpointError(f'{path}: unexpected key {k!r} in denoiser checkpoint')
    return out


def _config_from_weights(sd: Dict[str, torch.Tensor], backbone: str, path: Path) -> DenoiserConfig:
    pos = sd.get('pos_embed')
    if not isinstance(pos, torch.Tensor) or pos.ndim != 3:
        raise CheckpointError(f'{path}: pos_embed missing or not of shape (1, K*K, C)')
    grid = math.isqrt(pos.shape[1])
    if grid * grid != pos.shape[1]:
        raise CheckpointError(f'{path}: pos_embed has {pos.shape[1]} positions, not a square grid')
    embed_dim = pos.shape[-1]
    return DenoiserConfig(backbone=backbone, embed_dim=embed_dim, num_heads=default_num_heads(embed_dim),
                          grid_size=grid, patch_size={37: 14, 32: 16}.get(grid, 0))


def read_denoiser_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], DenoiserConfig]:
    """Read a denoiser from our directory format, a bare `model.safetensors`, or an authors' `.pth`.

    Returns the weights in our key layout and the config. For authors' files, the backbone id is taken
    from the file name (`<timm id>.pth`), as the authors name them.
    """
    path = weights_path(path)
    obj = load_state_dict_file(path)
    if path.suffix != '.safetensors':
        sd = _from_authors(obj, path)
        named = timm.is_model(backbone_arch(path.stem)) and path.stem.count('.') <= 1
        return sd, _config_from_weights(sd, path.stem if named else '', path)
    _refuse_backbone(obj, path)
    return obj, read_denoiser_config(path) or _config_from_weights(obj, '', path)


def weights_path(path: PathLike) -> Path:
    """The weights file of a checkpoint given as a file or as a directory in our format."""
    path = Path(path)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f'{path}: no {WEIGHTS_NAME} in checkpoint directory')
        return path / WEIGHTS_NAME
    return path


def refuse_to_replace(directory: PathLike, overwrite: bool) -> None:
    """Raise `FileExistsError` if `directory` already holds a denoiser and `overwrite` is not set."""
    existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (Path(directory) / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f'{directory} already holds a denoiser ({", ".join(existing)}); '
                              'give another folder, or --overwrite to replace it')


def read_denoiser_config(path: PathLike) -> Optional[DenoiserConfig]:
    """The `config.json` of a denoiser in our format (a directory or its `model.safetensors`), without
    loading the weights; None for an authors' `.pth` or a bare safetensors file."""
    path = weights_path(path)
    cfg_path = path.with_name(CONFIG_NAME)
    if path.suffix != '.safetensors' or not cfg_path.is_file():
        return None
    try:
        return DenoiserConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{cfg_path}: corrupt config ({e})') from e


def write_denoiser_checkpoint(directory: PathLike, state_dict: Dict[str, torch.Tensor], config: DenoiserConfig) -> None:
    """Write our format atomically: `config.json` and `model.safetensors` (denoiser weights only)."""
    directory = Path(directory)
    tensors = {k: v.detach().to('cpu', torch.float32).contiguous() for k, v in state_dict.items()}
    meta = {'format': 'dvt-timm', 'format_version': str(config.format_version), 'backbone': config.backbone}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
