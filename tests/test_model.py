"""DenoisedViT against the plain timm model: the real DINOv2-S backbone on the real sample photos."""
from functools import partial

import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import dvt_timm  # noqa: F401  (registers the models)
from dvt_timm import DenoisedViT
from helpers import write_authors_checkpoint


@pytest.fixture(scope='module')
def authors_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('authors') / 'vit_small_patch14_dinov2.lvd142m.pth'
    return path, write_authors_checkpoint(path, C=384, grid=37)


@pytest.fixture(scope='module')
def model(vits_checkpoint, authors_file):
    return DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint,
                       denoiser_checkpoint=authors_file[0]).eval()


INTERMEDIATE_ARGS = [
    dict(),
    dict(indices=3, norm=True),
    dict(indices=[0, 5, 11], return_prefix_tokens=True, output_fmt='NLC'),
    dict(indices=2, norm=True, intermediates_only=True),
    dict(indices=[4], stop_early=True),
    dict(indices=1, norm=True, output_dict=True, return_prefix_tokens=True),
]


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return [t for o in out for t in _flatten(o)]


@torch.inference_mode()
def test_denoise_off_is_bit_identical(model, plain_vits, photos):
    model.denoise(False)
    assert not model.denoising
    assert torch.equal(model.forward_features(photos), plain_vits.forward_features(photos))
    assert torch.equal(model(photos), plain_vits(photos))
    fmap = plain_vits.forward_intermediates(photos, indices=1, norm=True, intermediates_only=True)[0]
    assert torch.equal(model.feature_map(photos), fmap)
    for kwargs in INTERMEDIATE_ARGS:
        ours, theirs = _flatten(model.forward_intermediates(photos, **kwargs)), _flatten(
            plain_vits.forward_intermediates(photos, **kwargs))
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs)), kwargs
    model.denoise(True)


@torch.inference_mode()
def test_denoise_on_changes_only_patch_tokens(model, plain_vits, photos):
    assert model.denoise(True) is model and model.denoising
    raw, out = plain_vits.forward_features(photos), model.forward_features(photos)
    assert out.shape == raw.shape == (5, 1 + 19 * 25, 384)
    assert torch.equal(out[:, :1], raw[:, :1])  # class token untouched
    changed = (out[:, 1:] - raw[:, 1:]).abs().amax(-1) > 1e-3
    assert changed.all()  # every patch token goes through the denoiser
    assert torch.equal(model(photos), plain_vits(photos))  # the head reads the class token only
    fmap = model.feature_map(photos)
    assert fmap.shape == (5, 384, 19, 25)
    assert torch.equal(fmap.flatten(2).transpose(1, 2), out[:, 1:])
    raw_map, clean_map = model.raw_and_denoised(photos)
    assert torch.equal(clean_map, fmap)
    assert torch.equal(raw_map, model.denoise(False).feature_map(photos))
    model.denoise(True)


@torch.inference_mode()
def test_intermediates_denoise_last_block_only(model, plain_vits, photos):
    final, inter = model.forward_intermediates(photos, indices=[3, 11], return_prefix_tokens=True)
    ref_final, ref_inter = plain_vits.forward_intermediates(photos, indices=[3, 11], return_prefix_tokens=True)
    assert torch.equal(inter[0][0], ref_inter[0][0]) and torch.equal(inter[0][1], ref_inter[0][1])
    assert torch.equal(final, model.forward_features(photos))
    assert torch.equal(inter[1][0], model.feature_map(photos))
    assert torch.equal(inter[1][1], ref_final[:, :1])  # prefix of the last entry: normed, unchanged
    # Intermediates that stop before the last block are the backbone's own, even with denoising on.
    early = model.forward_intermediates(photos, indices=[2], stop_early=True, intermediates_only=True)
    assert torch.equal(early[0], plain_vits.forward_intermediates(
        photos, indices=[2], stop_early=True, intermediates_only=True)[0])


@torch.inference_mode()
def test_authors_file_matches_weights_loaded_by_hand(model, plain_vits, photos, authors_file):
    """The authors' structure is timm's Block (LayerNorm eps 1e-6, qkv bias, GELU, ratio 4) after adding
    the bicubically resized position embedding; load the file's tensors into it by hand."""
    _, sd = authors_file
    block = Block(dim=384, num_heads=6, mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    block.load_state_dict({k[len('denoiser.'):]: v for k, v in sd.items() if k.startswith('denoiser.')}, strict=True)
    pos = timm.layers.resample_abs_pos_embed(sd['pos_embed'], (19, 25), num_prefix_tokens=0)
    raw = plain_vits.forward_features(photos)
    expected = block.eval()(raw[:, 1:] + pos)
    torch.testing.assert_close(model.forward_features(photos)[:, 1:], expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_features_only_keeps_the_denoiser(vits_checkpoint, authors_file, photos):
    feats = timm.create_model('dvt_vit_small_patch14_dinov2', features_only=True, backbone_checkpoint=vits_checkpoint,
                              denoiser_checkpoint=authors_file[0]).eval()
    full = timm.create_model('dvt_vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint,
                             denoiser_checkpoint=authors_file[0]).eval()
    outs = feats(photos)
    assert len(outs) == 3 and feats.feature_info.channels() == [384] * 3
    assert feats.model.denoiser is not None
    torch.testing.assert_close(outs[-1], full.feature_map(photos))
    # Pruning to early layers drops the denoiser and the blocks after them.
    early = timm.create_model('dvt_vit_small_patch14_dinov2', features_only=True, out_indices=(2, 4))
    assert early.model.denoiser is None and len(early.model.backbone.blocks) == 5
    assert [o.shape[1] for o in early(photos)] == [384, 384]
    # Hooks would read the backbone's blocks and bypass the denoiser.
    with pytest.raises(ValueError, match="supports feature_cls='getter' .* only: 'hook' would read"):
        timm.create_model('dvt_vit_small_patch14_dinov2', features_only=True, feature_cls='hook')


@torch.inference_mode()
def test_pruned_norm_leaves_the_backbone_not_the_denoiser(vits_checkpoint, authors_file, plain_vits, photos):
    """timm's `prune_norm` drops the final norm from the outputs (so `denoise(False)` is still the pruned
    plain model's), while the denoiser goes on reading normed tokens (so its output does not change)."""
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint,
                        denoiser_checkpoint=authors_file[0]).eval()
    denoised = model.forward_features(photos)
    model.prune_intermediate_layers(indices=[5, 11], prune_norm=True)
    plain = timm.create_model('vit_small_patch14_dinov2', dynamic_img_size=True, num_classes=0).eval()
    plain.load_state_dict(plain_vits.state_dict())
    plain.prune_intermediate_layers(indices=[5, 11], prune_norm=True)
    assert isinstance(model.backbone.norm, torch.nn.Identity)
    assert torch.equal(model.denoise(False).forward_features(photos), plain.forward_features(photos))
    final, ref = model.forward_intermediates(photos, indices=1)[0], plain.forward_intermediates(photos, indices=1)[0]
    assert torch.equal(final, ref)
    assert torch.equal(model.denoise(True).forward_features(photos), denoised)


def test_timm_vit_api(model, plain_vits, photos):
    """The rest of timm VisionTransformer's surface, as DINO-style and timm training code reads it."""
    for name in ('head_hidden_size', 'global_pool', 'dynamic_img_size', 'has_class_token', 'num_reg_tokens'):
        assert getattr(model, name) == getattr(plain_vits, name), name
    assert model.default_cfg is model.pretrained_cfg
    before = dict(model.pretrained_cfg)
    model.set_input_size(patch_size=14)  # no new size: the data config stays the denoiser's
    assert model.pretrained_cfg == before
    with torch.inference_mode():
        layers = model.get_intermediate_layers(photos[:1], n=2, reshape=True, return_prefix_tokens=True)
        ref = model.forward_intermediates(photos[:1], indices=2, return_prefix_tokens=True, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(_flatten(layers), _flatten(ref)))
    # timm's layer-wise lr decay (for a trainable backbone): the backbone's scales as for the plain model, and
    # the denoiser learns at full lr.
    from timm.optim import param_groups_layer_decay
    def scales(m, prefix=''):
        names = {id(p): n.removeprefix(prefix) for n, p in m.named_parameters()}
        return {names[id(p)]: g['lr_scale'] for g in param_groups_layer_decay(m, layer_decay=0.75) for p in g['params']}
    ours = scales(DenoisedViT('vit_small_patch14_dinov2', freeze_backbone=False), 'backbone.')
    theirs = scales(timm.create_model('vit_small_patch14_dinov2', num_classes=0))
    assert {k: ours[k] for k in theirs} == theirs and theirs['blocks.0.attn.qkv.weight'] < 0.1
    assert ours['denoiser.pos_embed'] == ours['denoiser.block.attn.qkv.weight'] == theirs['norm.weight'] == 1.0


def test_a_new_head_trains_on_the_frozen_backbone(photos):
    model = timm.create_model('dvt_vit_small_patch14_dinov2', num_classes=5).train()
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if not n.startswith('head.'))
    model(photos[:1, :, :112, :112]).sum().backward()
    assert model.get_classifier().weight.grad is not None
    # A pretrained head (DeiT-III's 1000 classes) is part of the frozen backbone: only the denoiser trains, so
    # DistributedDataParallel over the denoised features finds no unused trainable parameter.
    deit = timm.create_model('dvt_deit3_base_patch16_224')
    assert deit.num_classes == 1000 and [n for n, p in deit.named_parameters() if p.requires_grad] == \
        [n for n, _ in deit.named_parameters() if n.startswith('denoiser.')]


def test_input_checks(model, photos):
    with pytest.raises(ValueError, match='3 input channels, got 1'):
        model.feature_map(photos[:, :1])
    with pytest.raises(ValueError, match='multiple of the patch size 14'):
        model.feature_map(photos[:, :, :260])
    with pytest.raises(ValueError, match='shape'):
        model.feature_map(photos[0])
    with pytest.raises(ValueError, match=r'with B >= 1, got \(0, 3, 266, 350\)'):
        model.feature_map(photos[:0])
    # Pixels as loaded (uint8) or in another precision: named, not torch's "Input type ... and bias type".
    for dtype in (torch.uint8, torch.float64):
        with pytest.raises(ValueError, match=f'expected torch.float32 images normalised .*, got {dtype}'):
            model.feature_map(photos.to(dtype))


@torch.inference_mode()
def test_padding_on_request(vits_checkpoint):
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint, dynamic_img_pad=True).eval()
    assert model.feature_map(torch.randn(1, 3, 260, 300)).shape == (1, 384, 19, 22)


def test_unsupported_backbone_is_rejected():
    with pytest.raises(ValueError, match='not a ViT with patch tokens'):
        DenoisedViT('resnet18')


@torch.inference_mode()
def test_wraps_an_instance(plain_vits, photos):
    model = DenoisedViT(plain_vits).denoise(False)
    assert torch.equal(model.feature_map(photos)[:, :, 0, 0], plain_vits.forward_features(photos)[:, 1])
    fixed = timm.create_model('vit_small_patch14_dinov2', img_size=224)
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        DenoisedViT(fixed).feature_map(photos)


def test_eva_family_off_is_identical():
    torch.manual_seed(0)
    model = DenoisedViT('eva02_base_patch16_clip_224', num_classes=0).eval()
    plain = timm.create_model('eva02_base_patch16_clip_224', num_classes=0, dynamic_img_size=True).eval()
    plain.load_state_dict(model.backbone.state_dict())
    x = torch.randn(1, 3, 160, 224)
    with torch.inference_mode():
        assert torch.equal(model.denoise(False).forward_features(x), plain.forward_features(x))
        out = model.denoise(True).forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True)
        ref = plain.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True)
        assert torch.equal(out[1][0][0], ref[1][0][0]) and not torch.equal(out[1][1][0], ref[1][1][0])
        assert torch.equal(out[0][:, :1], ref[0][:, :1])
        # output_dict (timm VisionTransformer's option, which Eva lacks) with the denoiser on or off.
        ref = plain.forward_intermediates(x, indices=2, return_prefix_tokens=True)
        for on in (False, True):
            d = model.denoise(on).forward_intermediates(x, indices=2, return_prefix_tokens=True, output_dict=True)
            assert sorted(d) == ['image_features', 'image_intermediates', 'image_intermediates_prefix']
            assert torch.equal(d['image_intermediates'][0], ref[1][0][0])
            assert torch.equal(d['image_intermediates_prefix'][0], ref[1][0][1])
            assert torch.equal(d['image_intermediates'][1], ref[1][1][0]) is not on  # the last block's: denoised
            assert torch.equal(d['image_features'], ref[0]) is not on


def test_direct_model_has_a_timm_data_config():
    model = DenoisedViT('vit_base_patch16_224.dino')
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg['input_size'] == (3, 512, 512) and cfg['mean'] == (0.485, 0.456, 0.406)
    assert (cfg['crop_pct'], cfg['crop_mode']) == (1.0, 'squash')  # the whole image, as DVT feeds it
    assert model.get_submodule(model.pretrained_cfg['first_conv']) is model.backbone.patch_embed.proj
    fixed = DenoisedViT('vit_small_patch16_224', dynamic_img_size=False)  # takes 224 px only
    assert timm.data.resolve_model_data_config(fixed)['input_size'] == (3, 224, 224)
    fixed.set_input_size(img_size=(256, 192))
    assert timm.data.resolve_model_data_config(fixed)['input_size'] == (3, 256, 192)
    assert fixed.feature_map(torch.randn(1, 3, 256, 192)).shape == (1, 384, 16, 12)
    with pytest.raises(ValueError, match='patch size of a DenoisedViT is fixed at 16'):
        fixed.set_input_size(patch_size=14)


def test_output_formats_timm_does_not_offer_are_refused(model, photos):
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(photos[:1], output_fmt='NHWC')


@torch.no_grad()
def test_resized_position_embedding_follows_in_place_updates():
    """EMA teachers update weights in place (`p.data.mul_`); a resized copy must never be served stale."""
    model = DenoisedViT('vit_small_patch16_224').eval()
    x = torch.randn(1, 3, 96, 128)  # a 6x8 grid, not the embedding's 32x32
    before = model.feature_map(x)
    model.denoiser.pos_embed.data.mul_(2)
    assert not torch.allclose(model.feature_map(x), before)
