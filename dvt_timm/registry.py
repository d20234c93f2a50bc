"""timm registration: `dvt_<timm architecture>` models with the authors' denoisers as pretrained tags.

Importing `dvt_timm` runs this module, after which `timm.create_model('dvt_vit_base_patch14_dinov2',
pretrained=True)` builds the backbone with timm's own pretrained weights and fetches the denoiser from
the Hugging Face Hub. Tags are `<backbone tag>_<denoiser training set>`, e.g. `lvd142m_voc`; the first
tag of each architecture is its default.
"""
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

from .checkpoint import backbone_arch
from .hub import fetch_denoiser
from .model import DenoisedViT, default_input_size

__all__ = ['AUTHORS_HUB_REPO', 'backbone_for']

AUTHORS_HUB_REPO = 'jjiaweiyang/DVT'

# Backbone (timm id) -> the authors' release folders holding a denoiser for it (`<set>_denoised/<id>.pth`).
_AUTHORS_RELEASES = {
    'vit_small_patch14_dinov2.lvd142m': ('voc',),
    'vit_base_patch14_dinov2.lvd142m': ('voc', 'imgnet'),
    'vit_large_patch14_dinov2.lvd142m': ('voc',),
    'vit_small_patch14_reg4_dinov2.lvd142m': ('voc',),
    'vit_base_patch14_reg4_dinov2.lvd142m': ('voc',),
    'vit_large_patch14_reg4_dinov2.lvd142m': ('voc',),
    'vit_base_patch16_224.dino': ('voc',),
    'vit_base_patch16_224.mae': ('voc',),
    'vit_base_patch16_clip_384.laion2b_ft_in12k_in1k': ('voc',),
    'vit_base_patch16_384.augreg_in21k_ft_in1k': ('voc',),
    'eva02_base_patch16_clip_224.merged2b': ('voc',),
    'deit3_base_patch16_224.fb_in1k': ('voc',),
}

# `dvt_<arch>.<tag>` -> backbone timm id, for every pretrained tag below.
_BACKBONES: Dict[str, str] = {}


def _cfg(backbone: str, **kwargs: Any) -> Dict[str, Any]:
    """A pretrained cfg: the backbone's normalisation and classes, DVT's input size (518 or 512)."""
    src = get_pretrained_cfg(backbone)
    size = default_input_size(int(backbone.split('patch')[1][:2]))
    return dict(
        input_size=(3, size, size), interpolation='bicubic', crop_pct=1.0, crop_mode='center',
        mean=src.mean, std=src.std, num_classes=0 if backbone.startswith('eva02') else src.num_classes,
        first_conv='backbone.patch_embed.proj', classifier='backbone.head', license=src.license,
        paper_ids='arXiv:2401.02957', **kwargs)


def _authors_cfgs() -> Dict[str, Dict[str, Any]]:
    cfgs = {}
    for backbone, sets in _AUTHORS_RELEASES.items():
        arch, backbone_tag = backbone.split('.')
        for train_set in sets:
            name = f'dvt_{arch}.{backbone_tag}_{train_set}'
            _BACKBONES[name] = backbone
            cfgs[name] = _cfg(
                backbone, hf_hub_id=AUTHORS_HUB_REPO, hf_hub_filename=f'{train_set}_denoised/{backbone}.pth',
                origin_url='https://github.com/Jiawei-Yang/Denoising-ViT',
                notes=(f'denoiser trained by the DVT authors on {train_set.upper()} (MIT)',))
    return cfgs


default_cfgs = generate_default_cfgs(_authors_cfgs())


def backbone_for(model_name: str) -> str:
    """The timm backbone id behind a registered `dvt_*` name (with or without tag)."""
    if model_name in _BACKBONES:
        return _BACKBONES[model_name]
    arch = backbone_arch(model_name)
    for name, backbone in _BACKBONES.items():  # the first (default) tag of the architecture
        if backbone_arch(name) == arch:
            return backbone
    raise ValueError(f'{model_name} is not a dvt-timm model')


def _pretrained_denoiser(cfg: PretrainedCfg, cache_dir: Optional[str]) -> Path:
    if cfg.file:
        return Path(cfg.file)
    if cfg.hf_hub_id:
        return fetch_denoiser(cfg.hf_hub_id, cfg.hf_hub_filename or None, cache_dir=cache_dir)
    raise RuntimeError(f'{cfg.architecture}.{cfg.tag} has no pretrained denoiser')


def _create_dvt(variant: str, pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """Build through timm's `build_model_with_cfg` (pretrained cfg, `features_only`) with DVT's loading:
    backbone weights via timm, the denoiser via the Hub, and `backbone_checkpoint=` /
    `denoiser_checkpoint=` file overrides that load whether or not `pretrained` is set."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None))
    kwargs.setdefault('backbone', backbone_for(f'{variant}.{cfg.tag}'))
    cache_dir = kwargs.pop('cache_dir', None)
    if cache_dir is not None:
        kwargs['cache_dir'] = cache_dir  # reaches timm.create_model for the backbone
    if pretrained and kwargs.get('denoiser_checkpoint') is None:
        kwargs['denoiser_checkpoint'] = _pretrained_denoiser(cfg, cache_dir)
    return build_model_with_cfg(
        partial(DenoisedViT, pretrained=pretrained), variant, pretrained=False, pretrained_cfg=cfg,
        feature_cfg=dict(out_indices=3, feature_cls='getter'), **kwargs)


@register_model
def dvt_vit_small_patch14_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-S/14 with a DVT denoiser."""
    return _create_dvt('dvt_vit_small_patch14_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_base_patch14_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-B/14 with a DVT denoiser."""
    return _create_dvt('dvt_vit_base_patch14_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_large_patch14_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-L/14 with a DVT denoiser."""
    return _create_dvt('dvt_vit_large_patch14_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_small_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-S/14 with 4 registers, with a DVT denoiser."""
    return _create_dvt('dvt_vit_small_patch14_reg4_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_base_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-B/14 with 4 registers, with a DVT denoiser."""
    return _create_dvt('dvt_vit_base_patch14_reg4_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_large_patch14_reg4_dinov2(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DINOv2 ViT-L/14 with 4 registers, with a DVT denoiser."""
    return _create_dvt('dvt_vit_large_patch14_reg4_dinov2', pretrained, **kwargs)


@register_model
def dvt_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """ViT-B/16 (DINO or MAE weights, by tag) with a DVT denoiser."""
    return _create_dvt('dvt_vit_base_patch16_224', pretrained, **kwargs)


@register_model
def dvt_vit_base_patch16_clip_384(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """CLIP ViT-B/16 (LAION-2B, fine-tuned on ImageNet) with a DVT denoiser."""
    return _create_dvt('dvt_vit_base_patch16_clip_384', pretrained, **kwargs)


@register_model
def dvt_vit_base_patch16_384(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """Supervised AugReg ViT-B/16 at 384 px with a DVT denoiser."""
    return _create_dvt('dvt_vit_base_patch16_384', pretrained, **kwargs)


@register_model
def dvt_eva02_base_patch16_clip_224(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """EVA02 CLIP ViT-B/16 with a DVT denoiser."""
    return _create_dvt('dvt_eva02_base_patch16_clip_224', pretrained, **kwargs)


@register_model
def dvt_deit3_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """DeiT-III ViT-B/16 with a DVT denoiser."""
    return _create_dvt('dvt_deit3_base_patch16_224', pretrained, **kwargs)
