"""`DenoisedViT`: a timm ViT backbone with a DVT denoiser on its final patch tokens."""
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import ModelHubMixin
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, HfHubHTTPError
from timm.layers import to_2tuple
from timm.models import adapt_input_conv
from timm.models._features import feature_take_indices
from torch import nn

from .checkpoint import (
    CARD_NAME, CONFIG_NAME, CheckpointError, DenoiserConfig, atomic_write, load_state_dict_file,
    read_denoiser_checkpoint, read_denoiser_config, same_backbone, write_denoiser_checkpoint,
)
from .denoiser import Denoiser
from .hub import fetch_denoiser

__all__ = ['DenoisedViT', 'default_input_size']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_MODEL_CARD = """---
{{ card_data }}
---

# {{ model_name | default("DVT denoiser", true) }}

A [Denoising Vision Transformers](https://arxiv.org/abs/2401.02957) denoiser for the timm backbone
`{{ backbone | default("see config.json", true) }}`, in the [dvt-timm](https://github.com/dvt-timm/dvt-timm)
format: `model.safetensors` holds the denoiser only; the backbone loads through timm.

```python
from dvt_timm import DenoisedViT
model = DenoisedViT.from_pretrained("{{ repo_id | default("path/to/this/repo", true) }}").eval()
features = model.feature_map(images)  # (B, C, h, w), denoised
```
"""


_SUPPORTED = ('DenoisedViT wraps timm VisionTransformer and Eva models such as DINOv2, DINO, MAE, CLIP, EVA02 '
              'and DeiT-III')


def _create_backbone(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """`timm.create_model`, with a family that takes no `dynamic_img_size` named as not a ViT."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # every timm ViT takes dynamic_img_size; other families do not
        if 'dynamic_img_size' not in str(e):
            raise
        raise ValueError(f'{name} is not a ViT with patch tokens: {_SUPPORTED}') from e
    except OSError as e:  # offline and not cached, HTTP errors: the Hub's message names neither model nor remedy
        if not pretrained:
            raise
        raise OSError(f'{name}: its pretrained weights could not be fetched ({type(e).__name__}: {e}). Without '
                      'network, pass backbone_checkpoint= (--backbone-checkpoint) with a local weights file') from e


def default_input_size(patch_size: int) -> int:
    """The input side DVT uses: 518 px for patch 14 (a 37x37 grid), 512 px otherwise (32x32 at patch 16)."""
    return 518 if patch_size == 14 else 512


def _strip_prefix(sd: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _first_lines(text: str, n: int = 6) -> str:
    """A long message (torch lists every mismatched tensor) cut to its first `n` lines."""
    lines = text.strip().splitlines()
    return '\n'.join(lines[:n] + ([f'... ({len(lines) - n} more lines)'] if len(lines) > n else []))


def _intermediates_dict(patches: List[torch.Tensor], prefixes: Optional[List[torch.Tensor]],
                        final: Optional[torch.Tensor]) -> Dict[str, Any]:
    """`forward_intermediates(output_dict=True)`'s result, with timm VisionTransformer's keys."""
    out: Dict[str, Any] = {'image_intermediates': list(patches)}
    if prefixes is not None:
        out['image_intermediates_prefix'] = list(prefixes)
    if final is not None:
        out['image_features'] = final
    return out


class DenoisedViT(
        nn.Module,
        ModelHubMixin,
        library_name='dvt-timm',
        tags=['dvt', 'timm', 'image-feature-extraction', 'vision-transformer'],
        paper_url='https://arxiv.org/abs/2401.02957',
        model_card_template=_MODEL_CARD,
):
    """A timm ViT (VisionTransformer or Eva family) followed by a DVT denoiser on its final patch tokens.

    The denoiser reads the last block's output after the backbone's final norm and changes only patch
    tokens; class and register tokens pass through. With `denoise(False)` every output is the plain
    backbone's, bit for bit.

    Args:
        backbone: a timm model id (optionally with tag) or a timm ViT instance.
        pretrained: load the backbone's pretrained weights through timm (ignored when
            `backbone_checkpoint` is given).
        backbone_checkpoint: a timm-layout state dict (`.safetensors` or `.pth`) for the backbone.
        denoiser_checkpoint: an authors' `.pth`, or a directory / `model.safetensors` in our format.
        grid_size: side K of the denoiser's learned position embedding; defaults to the patch grid at
            518 px (patch 14) or 512 px (other patch sizes). A loaded denoiser checkpoint brings its own.
        freeze_backbone: freeze the backbone and keep it in eval mode; a new classifier head (`num_classes=`
            other than the pretrained one's, or `reset_classifier`) stays trainable, as a probe on frozen features.
        **backbone_kwargs: passed to `timm.create_model` for the backbone (e.g. `num_classes`,
            `dynamic_img_pad=True` to accept sizes that are not multiples of the patch size).
    """

    def __init__(
            self,
            backbone: Union[str, nn.Module] = 'vit_small_patch14_dinov2.lvd142m',
            *,
            pretrained: bool = False,
            backbone_checkpoint: Optional[PathLike] = None,
            denoiser_checkpoint: Optional[PathLike] = None,
            grid_size: Optional[int] = None,
            freeze_backbone: bool = True,
            **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone_kwargs.setdefault('dynamic_img_size', True)
            download = pretrained and backbone_checkpoint is None
            if download:  # a model that is not a ViT is named before its weights are fetched (or fail to be)
                try:
                    with torch.device('meta'):
                        self._check_backbone(_create_backbone(backbone, False, backbone_kwargs))
                except (RuntimeError, NotImplementedError):  # an init that needs real tensors: checked below
                    pass
            backbone = _create_backbone(backbone, download, backbone_kwargs)
        elif isinstance(backbone, nn.Module):
            if backbone_kwargs:
                raise TypeError(f'backbone kwargs {sorted(backbone_kwargs)} only apply when backbone is a name')
            cfg = getattr(backbone, 'pretrained_cfg', None) or {}
            arch, tag = cfg.get('architecture'), cfg.get('tag')
            self.backbone_name = f'{arch}.{tag}' if arch and tag else (arch or '')
        else:
            raise TypeError(f'backbone must be a timm model name or nn.Module, got {type(backbone).__name__}')
        self._check_backbone(backbone)
        self.backbone = backbone

        self.patch_size: int = backbone.patch_embed.patch_size[0]
        self.embed_dim: int = backbone.embed_dim
        self.num_features: int = backbone.num_features
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.num_classes: int = backbone.num_classes
        self.in_chans: int = backbone.patch_embed.proj.in_channels
        self.feature_info = getattr(backbone, 'feature_info', None)
        self.grad_checkpointing = False
        # timm's data config for a directly built model: the backbone's, at DVT's input size or the one a
        # loaded denoiser was trained at (`timm.create_model` replaces it with the registered cfg), with DVT's
        # whole-image squash resize instead of a centre crop; module paths are this model's.
        cfg = dict(getattr(backbone, 'pretrained_cfg', None) or {})
        for key in ('first_conv', 'classifier'):
            if isinstance(cfg.get(key), str):
                cfg[key] = f'backbone.{cfg[key]}'
        self.pretrained_cfg = {**cfg, 'crop_pct': 1.0, 'crop_mode': 'squash'}
        self.denoiser_input_size: Optional[int] = None  # from a loaded denoiser's config, when it records one
        self._set_input_size()
        self.denoiser: Optional[Denoiser] = Denoiser(
            self.embed_dim, grid_size or default_input_size(self.patch_size) // self.patch_size)
        self._denoising = True
        # The final norm, moved here when timm's pruning drops it from the backbone (the denoiser reads normed tokens).
        self.denoiser_norm: Optional[nn.Module] = None

        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            pretrained_classes = (getattr(backbone, 'pretrained_cfg', None) or {}).get('num_classes')
            if self.num_classes and self.num_classes != pretrained_classes:  # a new head, as reset_classifier's
                self.backbone.get_classifier().requires_grad_(True)
            self.backbone.eval()
        if backbone_checkpoint is not None:
            self.load_backbone_checkpoint(backbone_checkpoint)
        if denoiser_checkpoint is not None:
            self.load_denoiser(denoiser_checkpoint)

    @staticmethod
    def _check_backbone(model: nn.Module) -> None:
        if isinstance(model, DenoisedViT):
            raise ValueError(f'this is a DenoisedViT already (a ViT with a denoiser): build dvt_* models with '
                             f'timm.create_model, or give DenoisedViT the plain backbone, {model.backbone_name}')
        needed = ('patch_embed', 'blocks', 'norm', 'num_prefix_tokens', 'forward_intermediates')
        missing = [a for a in needed if not hasattr(model, a)]
        if missing or not hasattr(model.patch_embed, 'patch_size'):
            raise ValueError(
                f'{type(model).__name__} is not a ViT with patch tokens (missing {missing or ["patch_size"]}): '
                f'{_SUPPORTED}')
        fc_norm = getattr(model, 'fc_norm', None)
        if isinstance(model.norm, nn.Identity) and fc_norm is not None and not isinstance(fc_norm, nn.Identity):
            # timm moves the final norm into the head for average / max pooling; the denoiser reads normed tokens.
            raise ValueError(
                f"{type(model).__name__}'s final norm was moved to fc_norm (global_pool={model.global_pool!r}), so "
                'its tokens reach the denoiser un-normed; keep it with fc_norm=False (VisionTransformer) or '
                'use_fc_norm=False (Eva)')

    def _set_input_size(self) -> None:
        """The data config's input size: the backbone's own when it takes one size only, else the size the
        loaded denoiser was trained at, else DVT's 518 / 512."""
        if getattr(self.backbone, 'dynamic_img_size', False):
            h = w = self.denoiser_input_size or default_input_size(self.patch_size)
        else:
            h, w = self.backbone.patch_embed.img_size
        self.pretrained_cfg = {**self.pretrained_cfg, 'input_size': (self.in_chans, h, w)}

    # ----------------------------------------------------------------- switches
    @property
    def denoising(self) -> bool:
        """Whether the denoiser is applied (read-only; use `denoise()`)."""
        return self._denoising

    def denoise(self, enabled: bool = True) -> 'DenoisedViT':
        """Turn the denoiser on or off; returns the model."""
        if enabled and self.denoiser is None:
            raise RuntimeError('the denoiser was pruned away with the last block; it cannot be enabled')
        self._denoising = bool(enabled)
        return self

    def train(self, mode: bool = True) -> 'DenoisedViT':
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone never runs dropout or drop-path
        return self

    # ----------------------------------------------------------------- weights
    def load_backbone_checkpoint(self, path: PathLike) -> None:
        """Load a timm-layout backbone state dict (also unwraps `state_dict` / `model` entries and
        `module.` / `model.` prefixes, as in the authors' distilled files)."""
        sd = load_state_dict_file(path)
        for key in ('state_dict', 'model'):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
        sd = _strip_prefix(_strip_prefix(sd, 'module.'), 'model.')
        if 'denoiser' in sd or sd and all(k == 'pos_embed' or k.startswith(('block.', 'denoiser.')) for k in sd):
            raise CheckpointError(f'{path}: is a denoiser checkpoint, not backbone weights; pass it as '
                                  'denoiser_checkpoint (CLI: --denoiser-checkpoint)')
        # timm's own filter converts original (e.g. Meta DINOv2) layouts and resizes position embeddings.
        filter_fn = getattr(sys.modules[type(self.backbone).__module__], 'checkpoint_filter_fn', None)
        name = self.backbone_name or type(self.backbone).__name__
        try:
            if filter_fn is not None:
                sd = filter_fn(sd, self.backbone)
            sd, new_head = self._adapt_to_backbone(sd)
            missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f'{path}: does not fit backbone {name}: {_first_lines(str(e))}') from e
        missing = [k for k in missing if not k.startswith(new_head)]
        if missing or unexpected:
            raise CheckpointError(f'{path}: does not fit backbone {name}: missing keys {missing[:8]}, '
                                  f'unexpected keys {unexpected[:8]} ({len(missing)} and {len(unexpected)} in all)')

    def _adapt_to_backbone(self, sd: Dict[str, Any]) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
        """As timm does for pretrained weights: sum or repeat the first conv's input channels for
        `in_chans` != 3, and leave a freshly initialised head where the checkpoint's does not fit
        (`num_classes`, `global_pool='map'`). Returns the state dict and the key prefixes of the new head."""
        sd = dict(sd)
        own = self.backbone.state_dict()
        conv = f'{self.backbone.pretrained_cfg.get("first_conv", "patch_embed.proj")}.weight'
        if conv in sd and conv in own and sd[conv].shape[1] != own[conv].shape[1]:
            source = sd[conv].shape[1]
            # any timm converts RGB weights; base_chans (a checkpoint of other than 3 channels) is timm >= 1.0.31
            sd[conv] = adapt_input_conv(own[conv].shape[1], sd[conv], **({} if source == 3 else {'base_chans': source}))
        head = self.backbone.pretrained_cfg.get('classifier', 'head')
        head_keys = [k for k in sd if k.startswith(f'{head}.')]
        if any(k not in own or own[k].shape != sd[k].shape for k in head_keys):
            for k in head_keys:
                del sd[k]
        new_head = (f'{head}.', 'attn_pool.')
        fresh = sorted({k.split('.')[0] for k in own if k.startswith(new_head) and k not in sd})
        if fresh:
            _logger.info('backbone checkpoint has no weights for %s: left freshly initialised', ', '.join(fresh))
        return sd, new_head

    def denoiser_config(self) -> DenoiserConfig:
        return DenoiserConfig(
            backbone=self.backbone_name, embed_dim=self.embed_dim, num_heads=self.denoiser.num_heads,
            grid_size=self.denoiser.grid_size, patch_size=self.patch_size, input_size=self.denoiser_input_size)

    def load_denoiser(self, path: PathLike) -> None:
        """Load denoiser weights from an authors' `.pth` or our format, checking they fit this backbone."""
        sd, cfg = read_denoiser_checkpoint(path)
        mine = self.denoiser_config()
        for name in ('embed_dim', 'patch_size', 'num_heads'):
            theirs = getattr(cfg, name)
            if theirs and theirs != getattr(mine, name):
                raise CheckpointError(
                    f'{path}: denoiser {name} is {theirs} but backbone {self.backbone_name} needs {getattr(mine, name)}')
        if cfg.backbone and self.backbone_name and not same_backbone(cfg.backbone, self.backbone_name):
            raise CheckpointError(
                f'{path}: denoiser was trained for backbone {cfg.backbone}, not {self.backbone_name}')
        if cfg.grid_size and cfg.grid_size != self.denoiser.grid_size:
            # The position embedding is resized to any patch grid, so its stored size is the checkpoint's to choose.
            old = self.denoiser
            self.denoiser = Denoiser(self.embed_dim, cfg.grid_size).to(old.pos_embed.device, old.pos_embed.dtype)
            self.denoiser.train(old.training)
        try:
            self.denoiser.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f'{path}: denoiser weights do not fit: {_first_lines(str(e))}') from e
        # The data config follows the size the denoiser was trained at, when its config records one.
        self.denoiser_input_size = cfg.input_size
        self._set_input_size()

    def save_pretrained(
            self,
            save_directory: PathLike,
            *,
            repo_id: Optional[str] = None,
            push_to_hub: bool = False,
            model_card_kwargs: Optional[Dict[str, Any]] = None,
            config: Optional[Any] = None,
            **push_to_hub_kwargs: Any,
    ) -> Optional[str]:
        """Write the denoiser in our format: `config.json` (what it is and which backbone it is for),
        `model.safetensors` (its weights) and a model card `README.md` when the folder has none. Each file is
        replaced atomically, so a folder that loaded before still loads if this is interrupted. With
        `push_to_hub`, also upload it (see `push_to_hub`). `config` is ignored: config.json is the denoiser's."""
        if self.denoiser is None:
            raise RuntimeError('this model has no denoiser to save (it was pruned away with the last block)')
        trainable = [name for name, p in self.backbone.named_parameters() if p.requires_grad]
        if trainable:
            _logger.warning('save_pretrained writes the denoiser only: backbone parameters are trainable here (%s%s), '
                            'and what they have learned is not saved; save model.backbone.state_dict() yourself and '
                            'load it with backbone_checkpoint=', ', '.join(trainable[:3]),
                            ', ...' * (len(trainable) > 3))
        save_directory = Path(save_directory)
        write_denoiser_checkpoint(save_directory, self.denoiser.state_dict(), self.denoiser_config())
        card_path = save_directory / CARD_NAME
        if not card_path.exists():  # as huggingface_hub does: a card written or edited by hand is kept
            card = self.generate_model_card(**(model_card_kwargs or {}))
            atomic_write(card_path, lambda tmp: card.save(tmp))
        if push_to_hub:
            return self.push_to_hub(repo_id or save_directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The model card `save_pretrained` / `push_to_hub` write, naming this model's backbone."""
        kwargs.setdefault('backbone', self.backbone_name or None)
        return super().generate_model_card(*args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """huggingface_hub's `push_to_hub`; the model card's snippet loads from `repo_id`."""
        kwargs['model_card_kwargs'] = {'repo_id': repo_id, **(kwargs.get('model_card_kwargs') or {})}
        return super().push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(
            cls,
            pretrained_model_name_or_path: PathLike,
            *,
            revision: Optional[str] = None,
            cache_dir: Optional[PathLike] = None,
            force_download: bool = False,
            local_files_only: bool = False,
            token: Optional[Union[str, bool]] = None,
            backbone_checkpoint: Optional[PathLike] = None,
            **model_kwargs: Any,
    ) -> 'DenoisedViT':
        """A denoiser in our format, from a local folder or a Hub repo id (`user/name`, through the Hub cache),
        on the backbone its config.json names: timm's pretrained weights, or `backbone_checkpoint`.

        `model_kwargs` go to `DenoisedViT` (e.g. `pretrained=False` for a random backbone, `dynamic_img_pad=True`);
        config.json only says what the denoiser is, so a downloaded one cannot set other options.
        """
        path = Path(pretrained_model_name_or_path)
        if path.exists():
            source = path
        elif len(path.parts) == 1:  # denoisers on the Hub are user/name
            raise FileNotFoundError(f'no denoiser folder at {path}, and it is not a Hub repo id (user/name)')
        elif path.parent.is_dir():
            # 'runs/denoiser' is also a valid repo id, but with a local 'runs/' it is a mistyped path: say so now
            # rather than after the Hub's retries.
            raise FileNotFoundError(f'no denoiser folder at {path} (its parent folder exists, so it is not taken '
                                    'for a Hub repo id)')
        else:
            try:
                source = fetch_denoiser(str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
                                        force_download=force_download, local_files_only=local_files_only, token=token)
            except HFValidationError as e:  # neither a folder nor a valid repo id: most likely a mistyped path
                raise FileNotFoundError(f'no denoiser folder at {path}, and it is not a Hub repo id (user/name)') from e
            except (EntryNotFoundError, HfHubHTTPError, OSError) as e:  # offline and not cached, no such repo
                raise OSError(f'{pretrained_model_name_or_path}: not a local folder, so taken for a Hub repo id, and '
                              f'its denoiser could not be fetched ({type(e).__name__}: {e})') from e
        cfg = read_denoiser_config(source)
        if cfg is None or not cfg.backbone:
            raise CheckpointError(f'{source}: no {CONFIG_NAME} naming the backbone; load these weights with '
                                  "DenoisedViT('<backbone>', denoiser_checkpoint=...) instead")
        pretrained = model_kwargs.pop('pretrained', backbone_checkpoint is None)  # False: a random backbone
        model_kwargs.setdefault('grid_size', cfg.grid_size)
        return cls(cfg.backbone, pretrained=pretrained, backbone_checkpoint=backbone_checkpoint,
                   denoiser_checkpoint=source, **model_kwargs)

    # ----------------------------------------------------------------- forward
    def _grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """Validate an image batch and return its patch grid (h, w)."""
        if x.ndim != 4 or not len(x):
            raise ValueError(f'expected images of shape (B, C, H, W) with B >= 1, got {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})')
        dtype = self.backbone.patch_embed.proj.weight.dtype
        if x.dtype != dtype and not (x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f'expected {dtype} images normalised with the data config\'s mean and std, got {x.dtype}; '
                             'convert them (timm.data.create_transform does), or run under torch.autocast')
        H, W = x.shape[-2:]
        patch_embed = self.backbone.patch_embed
        if not getattr(self.backbone, 'dynamic_img_size', False):
            if (H, W) != tuple(patch_embed.img_size):
                raise ValueError(
                    f'this backbone takes only {patch_embed.img_size[0]}x{patch_embed.img_size[1]} images, got '
                    f'{H}x{W}; create it with dynamic_img_size=True for other sizes')
            return tuple(patch_embed.grid_size)
        if not patch_embed.dynamic_img_pad and (H % self.patch_size or W % self.patch_size):
            raise ValueError(
                f'image size {H}x{W} is not a multiple of the patch size {self.patch_size}; resize it, '
                'or create the model with dynamic_img_pad=True to pad')
        return tuple(patch_embed.dynamic_feat_size((H, W)))

    def _denoise_tokens(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Denoise the patch tokens of the backbone's final token sequence (B, prefix + h*w, C)."""
        if self.denoiser_norm is not None:
            x = self.denoiser_norm(x)
        n = self.num_prefix_tokens
        patches = self.denoiser(x[:, n:], grid)
        return torch.cat([x[:, :n], patches], dim=1) if n else patches

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + h*w, C) normed tokens as timm returns them, patch tokens denoised when on."""
        grid = self._grid(x)
        x = self.backbone.forward_features(x)
        return self._denoise_tokens(x, grid) if self._denoising else x

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Final-layer dense features (B, C, h, w), denoised when on."""
        h, w = self._grid(x)
        tokens = self.forward_features(x)[:, self.num_prefix_tokens:]
        return tokens.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def raw_and_denoised(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both final-layer feature maps (B, C, h, w) from one backbone pass: the raw ones (the backbone's output;
        without its final norm once `prune_intermediate_layers(prune_norm=True)` dropped it) and the denoised ones
        (whatever `denoising` says), for comparisons and for training targets."""
        if self.denoiser is None:
            raise RuntimeError('this model has no denoiser (it was pruned away)')
        grid = self._grid(x)
        tokens = self.backbone.forward_features(x)
        n = self.num_prefix_tokens
        raw, clean = tokens[:, n:], self._denoise_tokens(tokens, grid)[:, n:]
        to_map = lambda t: t.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return to_map(raw), to_map(clean)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The backbone's own head (pooling, norm, classifier) on tokens from `forward_features`."""
        return self.backbone.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward_head(forward_features(x))`, as in timm: the backbone's classifier output (or pooled
        features when `num_classes=0`). With class-token pooling (every DVT backbone's default) the head
        never reads a patch token, so the denoiser is skipped."""
        if self._denoising and getattr(self.backbone, 'global_pool', 'token') != 'token':
            return self.forward_head(self.forward_features(x))
        self._grid(x)
        return self.backbone(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            **kwargs: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's `forward_intermediates`. With denoising on, the last block's entry is the denoised final
        feature map (taken after the final norm, which the denoiser expects, whatever `norm` says), and the
        final features are `forward_features`'s; every other entry is the backbone's own."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        grid = self._grid(x)
        last = len(self.backbone.blocks) - 1
        take_indices, max_index = feature_take_indices(last + 1, indices)
        denoise_last = self._denoising and last in take_indices
        denoise_final = self._denoising and not intermediates_only and (not stop_early or max_index == last)
        n = self.num_prefix_tokens
        with_prefix = return_prefix_tokens and n > 0
        output_dict = kwargs.pop('output_dict', False)  # built here: Eva's forward_intermediates has no such option
        if not (denoise_last or denoise_final):
            out = self.backbone.forward_intermediates(
                x, indices=indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, **kwargs)
            if not output_dict:
                return out
            final, inter = (None, out) if intermediates_only else out
            prefixes = None
            if with_prefix:  # (patches, prefix) pairs
                inter, prefixes = [list(t) for t in zip(*inter)] if inter else ([], [])
            return _intermediates_dict(inter, prefixes, final)

        final, inter = self.backbone.forward_intermediates(
            x, indices=indices, return_prefix_tokens=bool(n), norm=norm, stop_early=stop_early,
            output_fmt='NLC', intermediates_only=False, **kwargs)
        if n:
            patches, prefixes = [list(t) for t in zip(*inter)] if inter else ([], [])
        else:
            patches, prefixes = list(inter), [final[:, :0]] * len(inter)
        final = self._denoise_tokens(final, grid)
        if denoise_last:
            prefixes[-1], patches[-1] = final[:, :n], final[:, n:]
        if output_fmt == 'NCHW':
            patches = [y.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
        if output_dict:
            return _intermediates_dict(patches, prefixes if with_prefix else None,
                                       None if intermediates_only else final)
        intermediates = list(zip(patches, prefixes)) if with_prefix else patches
        return intermediates if intermediates_only else (final, intermediates)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning. A pruned final norm leaves the backbone's outputs, as in timm, but the denoiser
        (while it is kept) goes on reading normed tokens."""
        take_indices, _ = feature_take_indices(len(self.backbone.blocks), indices)
        keeps_last = len(self.backbone.blocks) - 1 in take_indices
        if prune_norm and keeps_last and self.denoiser_norm is None:
            self.denoiser_norm = self.backbone.norm
        take_indices = self.backbone.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if not keeps_last:
            self.denoiser_norm = None
            self.denoiser, self._denoising = None, False
        self.num_classes = self.backbone.num_classes
        return take_indices

    def get_intermediate_layers(
            self,
            x: torch.Tensor,
            n: Union[int, List[int], Tuple[int, ...]] = 1,
            reshape: bool = False,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            **kwargs: Any,
    ) -> List[torch.Tensor]:
        """timm's DINO-style `get_intermediate_layers`, through `forward_intermediates` (so the last block's
        entry is denoised when on)."""
        return self.forward_intermediates(
            x, n, return_prefix_tokens=return_prefix_tokens, norm=norm, output_fmt='NCHW' if reshape else 'NLC',
            intermediates_only=True, **kwargs)

    # ----------------------------------------------------------------- timm conveniences
    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name for `pretrained_cfg`."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @property
    def head_hidden_size(self) -> int:
        return getattr(self.backbone, 'head_hidden_size', self.num_features)

    @property
    def global_pool(self) -> str:
        return self.backbone.global_pool

    @property
    def dynamic_img_size(self) -> bool:
        return getattr(self.backbone, 'dynamic_img_size', False)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.backbone, 'has_class_token', self.backbone.cls_token is not None)

    @property
    def num_reg_tokens(self) -> int:
        return getattr(self.backbone, 'num_reg_tokens', self.num_prefix_tokens - int(self.has_class_token))

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """timm's `set_input_size`: the backbone's image size (and the data config's); the patch size is fixed,
        since the denoiser works on the backbone's patch tokens."""
        if patch_size is not None and tuple(to_2tuple(patch_size)) != (self.patch_size, self.patch_size):
            raise ValueError(f'the patch size of a DenoisedViT is fixed at {self.patch_size}; got {patch_size}')
        self.backbone.set_input_size(img_size=img_size)
        if img_size is not None:
            h, w = self.backbone.patch_embed.img_size
            self.pretrained_cfg = {**self.pretrained_cfg, 'input_size': (self.in_chans, h, w)}

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.backbone.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The backbone's layer groups (e.g. for timm's layer-wise lr decay), with the denoiser in the final
        norm's group after the last block."""
        def under_backbone(pattern: str) -> str:
            return rf'^backbone\.(?:{pattern.lstrip("^")})'

        matcher = {}
        for group, spec in self.backbone.group_matcher(coarse).items():
            if isinstance(spec, str):
                matcher[group] = under_backbone(spec)
            else:
                matcher[group] = [(under_backbone(pattern), suffix) for pattern, suffix in spec]
        if isinstance(matcher.get('blocks'), list):
            matcher['blocks'].append((r'^denoiser', (99999,)))
        return matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        nwd = getattr(self.backbone, 'no_weight_decay', lambda: set())()
        return {f'backbone.{k}' for k in nwd} | {'denoiser.pos_embed'}
