"""From images to stage-1 results: views, batched feature extraction, decomposition."""
import os
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import nn

from ..data import image_to_tensor, load_image
from ..model import DenoisedViT, default_input_size
from ..precision import bf16_is_native
from .decomposition import PRESETS, Decomposition, FieldSettings, decompose, image_seed
from .encoding import check_backend
from .views import render_views, sample_views, view_coords

__all__ = ['denoise_image', 'denoise_images', 'extract_view_features', 'image_view_features', 'resolve_settings']

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]


def _backbone(model: nn.Module) -> nn.Module:
    backbone = model.backbone if isinstance(model, DenoisedViT) else model
    DenoisedViT._check_backbone(backbone)  # a ResNet is named here, not by an AttributeError deep inside
    return backbone


def resolve_settings(settings: Union[None, str, FieldSettings], patch_size: int,
                     device: Union[None, str, torch.device] = None) -> FieldSettings:
    """A preset name or settings object, with the image size filled in for this patch size and `amp` for
    `device` (default the CPU): bf16 autocast where the device computes in bf16 natively."""
    if settings is None:
        settings = PRESETS['paper']
    elif isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f'unknown settings preset {settings!r}; use one of {sorted(PRESETS)} or a FieldSettings')
        settings = PRESETS[settings]
    elif not isinstance(settings, FieldSettings):
        raise TypeError(f'settings must be a preset name ({", ".join(sorted(PRESETS))}) or a FieldSettings, got '
                        f'{type(settings).__name__}; for a few changes use PRESETS[name].with_overrides(...)')
    if settings.image_size is None:
        settings = settings.with_overrides(image_size=default_input_size(patch_size))
    if settings.image_size % patch_size:
        raise ValueError(f'image_size {settings.image_size} is not a multiple of the patch size {patch_size}')
    device = torch.device(device if device is not None else 'cpu')
    if settings.amp is None:
        settings = settings.with_overrides(amp=bf16_is_native(device))
    elif settings.amp and not bf16_is_native(device):
        warnings.warn(f'bf16 autocast on {device}, which has no native bf16: feature extraction may be several '
                      'times slower than in fp32 (amp=False, or leave amp unset to choose by device)', stacklevel=2)
    return settings


@torch.no_grad()
def extract_view_features(
        backbone: nn.Module,
        views: torch.Tensor,
        batch_size: int = 32,
        amp: bool = True,
) -> torch.Tensor:
    """Last-block features after the final norm, patch tokens only: (V, 3, S, S) -> (V, K, K, C).

    With `amp`, the backbone runs under bf16 autocast (on the GPU, and on CPUs with bf16 units)."""
    n = backbone.num_prefix_tokens
    K = views.shape[-1] // backbone.patch_embed.patch_size[0]
    device = next(backbone.parameters()).device
    out = []
    for chunk in views.split(batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            tokens = backbone.forward_features(chunk.to(device, non_blocking=True))[:, n:]
        out.append(tokens.reshape(len(chunk), K, K, -1))
    return torch.cat(out)


def _as_tensor(image: ImageLike, size: int, mean, std) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f'expected a normalised (3, H, W) image tensor, got shape {tuple(image.shape)}')
        if not image.is_floating_point():
            raise ValueError(f'expected a normalised float (3, H, W) image tensor, got {image.dtype}')
        if not image.isfinite().all():
            raise ValueError('the image tensor holds NaN or inf values')
        image = image.float()  # the pipeline works in fp32 (bicubic resizing has no fp16 CPU kernel)
        if image.shape[-2:] != (size, size):
            image = torch.nn.functional.interpolate(image[None], size=(size, size), mode='bicubic',
                                                    align_corners=False, antialias=True)[0]
        return image
    if isinstance(image, Image.Image):
        return image_to_tensor(image, size, mean, std)
    if isinstance(image, (str, os.PathLike)):
        return image_to_tensor(load_image(image), size, mean, std)
    raise TypeError(f'expected an image path, a PIL image or a normalised (3, H, W) tensor, got {type(image).__name__}')


def image_view_features(
        backbone: nn.Module,
        image: torch.Tensor,
        settings: FieldSettings,
        seed: int,
        amp: bool,
        extract_batch: int = 32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One image's stage-1 inputs: the features (V, K, K, C) of its full view and of `settings.n_views` random
    views drawn from `seed`, and their image coordinates (V, K, K, 2).

    `image` is normalised (3, S, S) at the settings' (resolved) image size. Views are rendered on the
    backbone's device, `extract_batch` at a time, into one buffer: bf16 on the GPU with `amp` (the features'
    precision there anyway), where 769 views of ViT-B at 518 px would otherwise hold 3.2 GB of fp32 features,
    else fp32."""
    size = settings.image_size
    views = sample_views(settings.n_views, size, torch.Generator().manual_seed(seed),
                         settings.crop_scale, settings.crop_ratio)
    device = next(backbone.parameters()).device
    image = image.to(device)
    feats = None
    for start in range(0, len(views), extract_batch):
        chunk = extract_view_features(backbone, render_views(image, views[start:start + extract_batch]),
                                      extract_batch, amp)
        if feats is None:
            dtype = torch.bfloat16 if device.type == 'cuda' and amp else torch.float32
            feats = torch.empty((len(views), *chunk.shape[1:]), dtype=dtype, device=device)
        feats[start:start + len(chunk)] = chunk
    return feats, view_coords(views, size, size // backbone.patch_embed.patch_size[0])


def denoise_images(
        model: nn.Module,
        images: Sequence[ImageLike],
        settings: Union[None, str, FieldSettings] = None,
        keys: Optional[Sequence[str]] = None,
        device: Optional[Union[str, torch.device]] = None,
        backend: str = 'auto',
        extract_batch: int = 32,
        progress=None,
        keep_views: bool = False,
) -> List[Decomposition]:
    """Stage-1 denoising of several images at once; their fields are optimised together.

    Args:
        model: a `DenoisedViT` or a timm ViT; only its backbone is used.
        images: paths, PIL images, or normalised (3, H, W) tensors (squash-resized to the settings' size).
        settings: a preset name ('paper', 'fast') or `FieldSettings`; default 'paper'.
        keys: a stable key per image (e.g. file stem) that, with the seed, fixes its randomness;
            default: the position in `images`.
        device: where to run (the backbone is moved there, and stays); default the model's device.
        backend: hash-grid backend.
        extract_batch: views per backbone forward.
        progress: optional callable(stage: str, value) for progress reporting.
        keep_views: also return each view's raw features and F at the view's coordinates (`view_raw`,
            `view_denoised`, (V, K, K, C), view 0 the full image): V stage-2 training pairs per image.
    Returns:
        One `Decomposition` per image (raw, denoised = F, artifact = G, residual = Δ; each (K, K, C)).
    """
    backbone = _backbone(model)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    check_backend(backend, device)  # before the minutes of feature extraction, not after them
    if progress is not None and not callable(progress):
        raise TypeError(f'progress must be a callable(stage, value), got {type(progress).__name__}')
    if isinstance(keys, str):
        raise TypeError(f'keys must be a list of one key per image, got the string {keys!r}')
    patch = backbone.patch_embed.patch_size[0]
    settings = resolve_settings(settings, patch, device)
    fixed = tuple(backbone.patch_embed.img_size)
    if not getattr(backbone, 'dynamic_img_size', False) and fixed != (settings.image_size,) * 2:
        raise ValueError(f'this backbone takes only {fixed[0]}x{fixed[1]} images, but stage 1 feeds it '
                         f'{settings.image_size}x{settings.image_size} views; create it with dynamic_img_size=True')
    size = settings.image_size
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(backbone, 'pretrained_cfg', {})
    mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))
    one = isinstance(images, (str, os.PathLike, Image.Image)) or isinstance(images, torch.Tensor) and images.ndim != 4
    if one or not len(images):
        raise ValueError('images must be a non-empty list of paths, PIL images or (3, H, W) tensors; '
                         'use denoise_image for one image')
    keys = [str(k) for k in (keys if keys is not None else range(len(images)))]
    if len(keys) != len(images):
        raise ValueError(f'{len(keys)} keys for {len(images)} images')

    seeds = [image_seed(settings.seed, k) for k in keys]
    features, coords = [], []
    was_training = backbone.training
    backbone.eval().to(device)
    try:
        for image, seed in zip(images, seeds):
            feats, xy = image_view_features(backbone, _as_tensor(image, size, mean, std), settings, seed,
                                            settings.amp, extract_batch)
            features.append(feats)  # bf16 on the GPU with amp: 769 views of ViT-B are 1.6 GB per image even so
            coords.append(xy)
            if progress is not None:
                progress('extract', 1)
    finally:
        backbone.train(was_training)  # the caller's model keeps its mode
    batch = torch.stack(features)
    features.clear()  # not a second copy of every image's features during the optimisation
    result = decompose(batch, torch.stack(coords).to(device), seeds, settings, backend,
                       progress=(lambda step: progress('optimise', step)) if progress is not None else None,
                       keep_views=keep_views)
    return [result[b] for b in range(len(images))]


def denoise_image(model: nn.Module, image: ImageLike, **kwargs) -> Decomposition:
    """Stage-1 denoising of one image: raw, denoised (F on the full-image grid), artifact (G) and
    residual (Δ), each (K, K, C). Keyword arguments as for `denoise_images`."""
    return denoise_images(model, [image], **kwargs)[0]
