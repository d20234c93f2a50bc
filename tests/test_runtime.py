"""Run-time behaviour: torch.compile, bf16 autocast, no_grad, and what trains by default."""
import torch
import torch.nn.functional as F

from dvt_timm import DenoisedViT


def _model(vits_checkpoint):
    torch.manual_seed(0)
    return DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint)


def test_torch_compile_matches_eager(vits_checkpoint, photos):
    model = _model(vits_checkpoint).eval()
    x = photos[:2, :, :224, :224]
    compiled = torch.compile(model.feature_map)
    with torch.no_grad():
        eager = model.feature_map(x)
        out = compiled(x)
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        model.denoise(False)  # toggling recompiles rather than serving the stale graph
        torch.testing.assert_close(compiled(x), model.feature_map(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(compiled(x), eager, atol=1e-3)


def test_compiles_as_one_graph_at_any_grid():
    """`fullgraph=True` compiles, as for timm's own ViTs, when the position embedding must be resized."""
    torch.manual_seed(0)
    model = DenoisedViT('vit_tiny_patch16_224').eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        out = torch.compile(model.forward_features, backend='aot_eager', fullgraph=True)(x)
        torch.testing.assert_close(out, model.forward_features(x))


def test_bf16_autocast(vits_checkpoint, photos):
    model = _model(vits_checkpoint).eval()
    x = photos[:2, :, :224, :224]
    with torch.no_grad():
        ref = model.feature_map(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model.feature_map(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() > 1e-3  # the matmuls did run in bf16 ...
    assert F.cosine_similarity(out.float().flatten(1), ref.flatten(1)).min() > 0.99  # ... and agree with fp32


def test_backbone_frozen_denoiser_trainable(vits_checkpoint, photos):
    model = _model(vits_checkpoint).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.denoiser.parameters())
    assert not model.backbone.training and model.denoiser.training
    x = photos[:1, :, :140, :140]
    model.feature_map(x).square().mean().backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    # An optimiser step changes the position embedding; the resized copy used at inference follows.
    with torch.no_grad():
        before = model.eval().feature_map(x)
        model.denoiser.pos_embed.add_(1.0)
        assert not torch.allclose(model.feature_map(x), before)
    unfrozen = DenoisedViT('vit_small_patch14_dinov2', freeze_backbone=False).train()
    assert all(p.requires_grad for p in unfrozen.parameters()) and unfrozen.backbone.training
