"""Weight averaging of denoisers: timm's `avg_checkpoints.py` for our format.

A weighted mean of denoisers of one backbone and shape, e.g. of the weights before and after a fine-tune
(WiSE-FT, Wortsman et al. 2022: weights between a model and its fine-tune can keep some of what each does well).
"""
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint import (
    CARD_FRONT_MATTER, CARD_NAME, CheckpointError, DenoiserConfig, PathLike, atomic_write, file_sha256,
    read_denoiser_checkpoint, refuse_to_replace, same_backbone, weights_path, write_denoiser_checkpoint,
)

__all__ = ['average_denoisers', 'write_average']


def _checked_weights(n: int, weights: Optional[Sequence[float]]) -> List[float]:
    if n < 2:
        raise ValueError(f'give at least two denoisers to average, got {n}')
    weights = [1 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f'{len(weights)} weights for {n} denoisers')
    if abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f'the weights must sum to 1, they sum to {sum(weights):g}')
    return weights


def average_denoisers(paths: Sequence[PathLike], weights: Optional[Sequence[float]] = None
                      ) -> Tuple[Dict[str, torch.Tensor], DenoiserConfig]:
    """The weighted mean of denoisers (our folders or files, or authors' `.pth`), in float64 and stored as fp32.

    `weights` defaults to equal ones and must sum to 1, so that the mean stays on the denoisers' scale. The
    denoisers must be for the same backbone with the same width, heads, position-embedding grid and training
    size; the error names the first that differs.
    """
    weights = _checked_weights(len(paths), weights)
    loaded = [(Path(p), *read_denoiser_checkpoint(p)) for p in paths]
    backbone = next((cfg.backbone for _, _, cfg in loaded if cfg.backbone), '')
    if not backbone:
        raise CheckpointError('none of the denoisers says which backbone it is for (a bare model.safetensors '
                              'without config.json?); give at least one in our folder format')
    first_path, first_sd, first_cfg = loaded[0]
    for path, sd, cfg in loaded:
        if cfg.backbone and not same_backbone(cfg.backbone, backbone):
            raise CheckpointError(f'{path} is a denoiser for {cfg.backbone}, the others are for {backbone}')
        for field in ('embed_dim', 'num_heads', 'grid_size', 'patch_size', 'input_size'):
            if getattr(cfg, field) != getattr(first_cfg, field):
                raise CheckpointError(f'{path} has {field} {getattr(cfg, field)}, {first_path} has '
                                      f'{getattr(first_cfg, field)}: only denoisers of one shape can be averaged')
        if sd.keys() != first_sd.keys() or any(sd[k].shape != first_sd[k].shape for k in sd):
            raise CheckpointError(f'{path} and {first_path} hold different tensors')
    mean = {k: sum(w * sd[k].double() for w, (_, sd, _) in zip(weights, loaded)).float() for k in first_sd}
    return mean, replace(first_cfg, backbone=backbone)  # the first may not name its backbone (bare safetensors)


def _card(backbone: str, sources: List[Tuple[str, str, float]]) -> str:
    rows = '\n'.join(f'| `{name}` | `{digest}` | {weight:g} |' for name, digest, weight in sources)
    return CARD_FRONT_MATTER + f"""
# DVT denoiser for `{backbone}`

The weighted mean of the weights of {len(sources)} [Denoising Vision Transformers](https://arxiv.org/abs/2401.02957)
denoisers, made with `dvt-timm average-denoisers`. `model.safetensors` holds the denoiser only; the backbone loads
through timm (`DenoisedViT.from_pretrained("path/to/this/folder")`).

| denoiser | SHA-256 of its weights file | weight |
|---|---|---|
{rows}
"""


def write_average(paths: Sequence[PathLike], out: PathLike, weights: Optional[Sequence[float]] = None,
                  overwrite: bool = False) -> DenoiserConfig:
    """Average `paths` (see `average_denoisers`) and write the result to the folder `out` in our format, with a
    model card naming each source by its SHA-256 and weight. Refuses to replace a denoiser unless `overwrite`."""
    out = Path(out)
    refuse_to_replace(out, overwrite)
    weights = _checked_weights(len(paths), weights)
    mean, config = average_denoisers(paths, weights)
    sources = [(str(p), file_sha256(weights_path(p)), w) for p, w in zip(paths, weights)]
    write_denoiser_checkpoint(out, mean, config)
    atomic_write(out / CARD_NAME, lambda p: Path(p).write_text(_card(config.backbone, sources)))
    return config
