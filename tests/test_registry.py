"""timm registration: names, pretrained tags, data config, and a forward pass for every model."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dvt_timm  # noqa: F401
# _WEIGHTS, not importlib.resources.files('dvt_timm.weights'): the tests also run from a source checkout on
# PYTHONPATH, where weights/ is no package (test_a_source_checkout_imports_without_being_installed).
from dvt_timm.registry import _WEIGHTS, AUTHORS_HUB_REPO, backbone_for

REQUIRED = [
    'dvt_vit_small_patch14_dinov2', 'dvt_vit_base_patch14_dinov2', 'dvt_vit_large_patch14_dinov2',
    'dvt_vit_small_patch14_reg4_dinov2', 'dvt_vit_base_patch14_reg4_dinov2', 'dvt_vit_large_patch14_reg4_dinov2',
    'dvt_vit_base_patch16_224', 'dvt_vit_base_patch16_clip_384', 'dvt_eva02_base_patch16_clip_224',
    'dvt_deit3_base_patch16_224',
]


def test_names_and_pretrained_tags():
    names = timm.list_models('dvt_*')
    assert set(REQUIRED) <= set(names)
    released = timm.list_models('dvt_*', pretrained=True)
    assert {'dvt_vit_base_patch16_224.dino_voc', 'dvt_vit_base_patch16_224.mae_voc',
            'dvt_vit_base_patch14_dinov2.lvd142m_voc', 'dvt_vit_base_patch14_dinov2.lvd142m_imgnet'} <= set(released)
    assert all(any(r.startswith(n + '.') for r in released) for n in names)
    cfg = timm.get_pretrained_cfg('dvt_vit_base_patch14_dinov2.lvd142m_imgnet')
    assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (AUTHORS_HUB_REPO, 'imgnet_denoised/vit_base_patch14_dinov2.lvd142m.pth')
    assert backbone_for('dvt_vit_base_patch16_224.mae_voc') == 'vit_base_patch16_224.mae'
    assert backbone_for('dvt_vit_base_patch16_224') == 'vit_base_patch16_224.dino'  # first tag is the default


def test_a_source_checkout_imports_without_being_installed():
    # The repository root on sys.path, the installed package (editable or not) hidden: weights/ is found
    # beside the package, so the registry and the shipped denoiser's tag are there.
    root = Path(dvt_timm.__file__).resolve().parents[1]
    code = ('import sys, importlib.util\n'
            'sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]\n'
            f'sys.path.insert(0, {str(root)!r})\n'
            'import dvt_timm, timm\n'
            'assert dvt_timm.__file__.startswith(sys.path[0]), dvt_timm.__file__\n'
            'assert importlib.util.find_spec("dvt_timm.weights") is None\n'
            'print(" ".join(timm.list_models("dvt_vit_small_patch14_dinov2*", pretrained=True)))\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=root.parent)
    assert proc.returncode == 0, proc.stderr
    assert 'dvt_vit_small_patch14_dinov2.dvt_timm_photos' in proc.stdout.split()


@pytest.mark.parametrize('name', sorted(timm.list_models('dvt_*')))
@torch.inference_mode()
def test_builds_and_runs(name):
    model = timm.create_model(name, pretrained=False).eval()
    patch = model.patch_size
    data_cfg = timm.data.resolve_model_data_config(model)
    backbone_cfg = timm.get_pretrained_cfg(backbone_for(name))
    assert data_cfg['input_size'] == ((3, 518, 518) if patch == 14 else (3, 512, 512))
    assert data_cfg['mean'] == backbone_cfg.mean and data_cfg['std'] == backbone_cfg.std
    size = data_cfg['input_size'][1:]
    non_square = (448, 644) if patch == 14 else (448, 640)
    for h, w in (size, non_square):
        fmap = model.feature_map(torch.randn(1, 3, h, w))
        assert fmap.shape == (1, model.embed_dim, h // patch, w // patch)
        assert torch.isfinite(fmap).all()


def test_shipped_denoiser_loads_offline_and_lowers_artifacts(vits_checkpoint, sample_images):
    """weights/dvt_vit_small_patch14_dinov2 installs as package data and loads with no network (CI sets
    HF_HUB_OFFLINE=1); the authors' release stays the default tag; on real photos it removes positional
    structure."""
    from safetensors.torch import load_file

    from dvt_timm.data import load_batch, load_image
    from dvt_timm.evaluation import variance_share, zero_input_cosine, zero_input_map

    name = 'dvt_vit_small_patch14_dinov2.dvt_timm_photos'
    assert name in timm.list_models('dvt_*', pretrained=True)
    assert timm.get_pretrained_cfg('dvt_vit_small_patch14_dinov2').tag == 'lvd142m_voc'
    model = timm.create_model(name, pretrained=True, backbone_checkpoint=str(vits_checkpoint)).eval()
    shipped = load_file(str(_WEIGHTS / 'dvt_vit_small_patch14_dinov2' / 'model.safetensors'))
    state = model.denoiser.state_dict()
    assert shipped.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in shipped.items())

    # Its data config is the size it was trained at (448 px, from its config.json), not DVT's 518.
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg['input_size'] == timm.get_pretrained_cfg(name).input_size == (3, 448, 448)
    # timm's transform from that config feeds it as DVT and our tools do: the whole image squashed, not cropped.
    transform = timm.data.create_transform(**data_cfg)
    torch.testing.assert_close(torch.stack([transform(load_image(p)) for p in sample_images]),
                               load_batch(sample_images, 448, data_cfg['mean'], data_cfg['std']), rtol=0, atol=1e-6)
    with torch.inference_mode():
        raw, denoised = model.raw_and_denoised(load_batch(sample_images, 448, data_cfg['mean'], data_cfg['std']))
        reference = zero_input_map(model, 448)
    assert zero_input_cosine(denoised, reference) < zero_input_cosine(raw, reference)
    assert variance_share(denoised) < variance_share(raw)


@torch.inference_mode()
def test_a_fixed_size_model_is_built_at_its_data_config_size():
    """dynamic_img_size=False: the backbone takes the size the data config names (the shipped denoiser's 448),
    or the data config names the img_size= given."""
    shipped = str(_WEIGHTS / 'dvt_vit_small_patch14_dinov2')
    for kwargs, size in ((dict(), (448, 448)), (dict(img_size=(224, 280)), (224, 280))):
        model = timm.create_model('dvt_vit_small_patch14_dinov2.dvt_timm_photos', denoiser_checkpoint=shipped,
                                  dynamic_img_size=False, **kwargs).eval()
        assert timm.data.resolve_model_data_config(model)['input_size'] == (3, *size)
        assert model.feature_map(torch.randn(1, 3, *size)).shape == (1, 384, size[0] // 14, size[1] // 14)


def test_load_model_with_a_downloaded_backbone_builds_timms_head(monkeypatch, tmp_path):
    # The CLI's path for --denoiser-checkpoint without --backbone-checkpoint fetches the backbone itself:
    # its head must be the one timm.create_model(name) builds (EVA02 CLIP: none, not the 512-d projection).
    from dvt_timm import model as model_module
    from dvt_timm.registry import load_model
    build = model_module._create_backbone
    monkeypatch.setattr(model_module, '_create_backbone', lambda name, pretrained, kwargs: build(name, False, kwargs))
    name = 'dvt_eva02_base_patch16_clip_224'
    reference = timm.create_model(name, pretrained=False)
    reference.save_pretrained(tmp_path)
    loaded = load_model(name, denoiser_checkpoint=str(tmp_path / 'model.safetensors'))
    assert loaded.num_classes == reference.num_classes == 0
    assert torch.equal(loaded.denoiser.pos_embed, reference.denoiser.pos_embed)
