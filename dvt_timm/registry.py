"""timm registration: `dvt_<timm architecture>` models with the authors' denoisers as pretrained tags.

Importing `dvt_timm` runs this module, after which `timm.create_model('dvt_vit_base_patch14_dinov2',
pretrained=True)` builds the backbone with timm's own pretrained weights and fetches the denoiser from
the Hugging Face Hub. The releases are listed in `weights/manifest.json`: the authors' denoisers, tagged
`<backbone tag>_<training set>` (e.g. `lvd142m_voc`), and denoisers shipped in `weights/`. The first tag
of each architecture is its default.
"""
import dataclasses
import json
import logging
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional

import timm
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

from .checkpoint import backbone_arch, read_denoiser_config
from .hub import fetch_denoiser
from .model import DenoisedViT, default_input_size

__all__ = ['AUTHORS_HUB_REPO', 'backbone_for', 'resolve_backbone', 'check_checkpoints', 'load_model']

_logger = logging.getLogger(__name__)

AUTHORS_HUB_REPO = 'jjiaweiyang/DVT'


def _weights_folder() -> Any:
    """weights/ (the manifest and the shipped denoisers): installed as the package data `dvt_timm.weights`, or
    beside the package in a source checkout that is on sys.path without being installed."""
    try:
        return resources.files('dvt_timm.weights')
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / 'weights'


_WEIGHTS = _weights_folder()

# `dvt_<arch>.<tag>` -> backbone timm id, for every pretrained tag in the manifest.
_BACKBONES: Dict[str, str] = {}


def _cfg(backbone: str, input_size: Optional[int] = None, **kwargs: Any) -> Dict[str, Any]:
    """A pretrained cfg: the backbone's normalisation and classes, the denoiser's training size (default
    DVT's 518 or 512), and DVT's squash resize of the whole image (timm's transform then matches `data.load_image`
    + `image_to_tensor`, what the denoisers were trained on)."""
    src = get_pretrained_cfg(backbone) or get_pretrained_cfg(backbone_arch(backbone))
    if src is None:
        raise ValueError(f'weights/manifest.json: {backbone!r} is not a timm model')
    size = input_size or default_input_size(int(backbone.split('patch')[1][:2]))
    return dict(
        input_size=(3, size, size), interpolation='bicubic', crop_pct=1.0, crop_mode='squash',
        mean=src.mean, std=src.std, num_classes=0 if backbone.startswith('eva02') else src.num_classes,
        first_conv='backbone.patch_embed.proj', classifier='backbone.head', license=src.license,
        paper_ids='arXiv:2401.02957', **kwargs)


def _manifest_cfgs() -> Dict[str, Dict[str, Any]]:
    """Pretrained cfgs from `weights/manifest.json`: Hub files, or folders shipped in `weights/`."""
    manifest = json.loads(_WEIGHTS.joinpath('manifest.json').read_text())
    cfgs = {}
    for rel in manifest['releases']:
        missing = {'model', 'backbone', 'notes'} - rel.keys()
        if missing or ('folder' in rel) == ('hf_hub_id' in rel):
            raise ValueError(f'weights/manifest.json: release {rel.get("model")!r} needs model, backbone, notes and '
                             f'exactly one of folder / hf_hub_id (missing {sorted(missing)})')
        if rel['model'] in _BACKBONES:
            raise ValueError(f'weights/manifest.json: release {rel["model"]!r} is listed twice')
        _BACKBONES[rel['model']] = rel['backbone']
        if 'folder' in rel:
            folder = Path(str(_WEIGHTS.joinpath(rel['folder'])))
            trained = read_denoiser_config(folder)
            source = dict(file=str(folder), input_size=trained.input_size if trained else None)
        else:
            source = dict(hf_hub_id=rel['hf_hub_id'], hf_hub_filename=rel.get('hf_hub_filename', ''))
        cfgs[rel['model']] = _cfg(rel['backbone'], notes=(rel['notes'],), **source)
    return cfgs


default_cfgs = generate_default_cfgs(_manifest_cfgs())


def backbone_for(model_name: str) -> str:
    """The timm backbone id behind a registered `dvt_*` name (with or without tag)."""
    if model_name in _BACKBONES:
        return _BACKBONES[model_name]
    arch = backbone_arch(model_name)
    for name, backbone in _BACKBONES.items():  # the first (default) tag of the architecture
        if backbone_arch(name) == arch:
            return backbone
    raise ValueError(f'{model_name} is not a dvt-timm model')


def resolve_backbone(name: str) -> str:
    """A timm backbone id for a user-given name: registered `dvt_*` names map to their backbone."""
    return backbone_for(name) if name.startswith('dvt_') else name


def check_checkpoints(*paths: Optional[str]) -> None:
    """Fail early, naming the path, when a checkpoint that was asked for does not exist."""
    for path in paths:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f'checkpoint not found: {path}')


def load_model(
        name: str,
        backbone_checkpoint: Optional[str] = None,
        denoiser_checkpoint: Optional[str] = None,
        pretrained: bool = True,
        need_denoiser: bool = True,
) -> DenoisedViT:
    """A `DenoisedViT` in eval mode from a `dvt_*` name or a timm backbone id, as the CLI builds it.

    Weights come from the checkpoints when given, else (with `pretrained`) from timm / the Hub. Without
    `need_denoiser` no denoiser is fetched (raw features never touch it).
    """
    check_checkpoints(backbone_checkpoint, denoiser_checkpoint)
    denoiser_checkpoint = denoiser_checkpoint if need_denoiser else None
    fetch_backbone = pretrained and backbone_checkpoint is None
    fetch_denoiser = pretrained and need_denoiser and denoiser_checkpoint is None and name.startswith('dvt_')
    if not name.startswith('dvt_'):
        model = DenoisedViT(name, pretrained=fetch_backbone, backbone_checkpoint=backbone_checkpoint,
                            denoiser_checkpoint=denoiser_checkpoint)
    elif fetch_denoiser:  # timm's pretrained path: the released denoiser (and the backbone, unless given)
        model = timm.create_model(name, pretrained=True, backbone_checkpoint=backbone_checkpoint)
    elif fetch_backbone:  # the backbone's pretrained weights without fetching a denoiser
        # the head timm.create_model(name) would build: the dvt_* config's num_classes, not the backbone's
        model = DenoisedViT(backbone_for(name), pretrained=True, denoiser_checkpoint=denoiser_checkpoint,
                            num_classes=resolve_pretrained_cfg(name).num_classes)
    else:
        model = timm.create_model(name, pretrained=False, backbone_checkpoint=backbone_checkpoint,
                                  denoiser_checkpoint=denoiser_checkpoint)
    if need_denoiser and denoiser_checkpoint is None and not fetch_denoiser:
        _logger.warning('the denoiser is randomly initialised (no denoiser checkpoint): its "denoised" '
                        'output only exercises the mechanics')
    return model.eval()


def _pretrained_denoiser(cfg: PretrainedCfg, cache_dir: Optional[str]) -> Path:
    if cfg.file:
        return Path(cfg.file)
    if cfg.hf_hub_id:
        try:
            return fetch_denoiser(cfg.hf_hub_id, cfg.hf_hub_filename or None, cache_dir=cache_dir)
        except OSError as e:  # offline and not cached, no such repo or file, HTTP errors
            where = cfg.hf_hub_id + (f'/{cfg.hf_hub_filename}' if cfg.hf_hub_filename else '')
            shipped = ', '.join(n for n in _BACKBONES if get_pretrained_cfg(n).file)
            raise OSError(f'{cfg.architecture}.{cfg.tag}: its denoiser could not be fetched from the Hugging Face '
                          f'Hub ({where}: {type(e).__name__}: {e}). Without network, pass denoiser_checkpoint= '
                          f'(--denoiser-checkpoint) or use a denoiser installed with dvt-timm: {shipped}') from e
    raise RuntimeError(f'{cfg.architecture}.{cfg.tag} has no pretrained denoiser')


def _create_dvt(variant: str, pretrained: bool = False, **kwargs: Any) -> DenoisedViT:
    """Build through timm's `build_model_with_cfg` (pretrained cfg, `features_only`) with DVT's loading:
    backbone weights via timm, the denoiser via the Hub, and `backbone_checkpoint=` /
    `denoiser_checkpoint=` file overrides that load whether or not `pretrained` is set."""
    if kwargs.get('features_only') and kwargs.get('feature_cls', 'getter') != 'getter':
        raise ValueError(f"{variant}: features_only supports feature_cls='getter' (the default) only: "
                         f"{kwargs['feature_cls']!r} would read the backbone's blocks and bypass the denoiser")
    overlay = kwargs.pop('pretrained_cfg_overlay', None) or {}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.pop('pretrained_cfg', None),
                                 pretrained_cfg_overlay=overlay)
    kwargs.setdefault('backbone', backbone_for(f'{variant}.{cfg.tag}'))
    cache_dir = kwargs.pop('cache_dir', None)
    if cache_dir is not None:
        kwargs['cache_dir'] = cache_dir  # reaches timm.create_model for the backbone
    if pretrained and kwargs.get('denoiser_checkpoint') is None:
        kwargs['denoiser_checkpoint'] = _pretrained_denoiser(cfg, cache_dir)
    trained = read_denoiser_config(kwargs['denoiser_checkpoint']) if kwargs.get('denoiser_checkpoint') else None
    if trained is not None and trained.input_size and 'input_size' not in overlay:
        # the data config says the size the denoiser was trained at, unless the caller set one
        cfg = dataclasses.replace(cfg, input_size=(cfg.input_size[0], trained.input_size, trained.input_size))
    if kwargs.get('dynamic_img_size') is False:
        # a backbone of one size is built at the data config's, or the data config says the img_size= given
        if 'img_size' in kwargs:
            cfg = dataclasses.replace(cfg, input_size=(cfg.input_size[0], *to_2tuple(kwargs['img_size'])))
        else:
            kwargs['img_size'] = cfg.input_size[1:]
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
