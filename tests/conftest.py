"""Shared fixtures. Real data lives in `$DVT_SHARED` (see ../shared/README.md); `.ci/run` sets it.

Outside CI a test that needs it is skipped with the reason; under CI (`CI` set) it fails instead.
"""
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

SAMPLES = ('chelsea.png', 'astronaut.png', 'coffee.png', 'rocket.jpg', 'grace_hopper.jpg')


def skip_or_fail_under_ci(reason: str) -> None:
    """Skip a test whose requirement is missing; under CI, where everything it needs is installed, fail."""
    if os.environ.get('CI'):
        pytest.fail(reason + ' -- required under CI')
    pytest.skip(reason)


def require_triton() -> None:
    """Skip without triton; torch's Linux wheels bring it, so under CI its absence is a broken install."""
    from dvt_timm.fields.encoding import has_triton
    if not has_triton():
        skip_or_fail_under_ci('triton is not installed')


def shared_path(*parts: str) -> Path:
    """A path under $DVT_SHARED; skips (or fails, under CI) when it is not there."""
    root = os.environ.get('DVT_SHARED')
    path = Path(root, *parts) if root else None
    if path is None or not path.exists():
        skip_or_fail_under_ci(f'real data {"/".join(parts)} not found: set DVT_SHARED to the shared data folder '
                              f'(DVT_SHARED={root!r})')
    return path


@pytest.fixture(autouse=True)
def _keep_matmul_precision():
    """`dvt-timm denoise-images` sets TF32 matmuls for its process; called in-process by a test, it must not
    change the precision of the tests after it (a GPU's results would move by TF32 rounding)."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture(scope='session')
def vits_checkpoint() -> Path:
    """The real DINOv2 ViT-S/14 backbone in timm layout."""
    return shared_path('weights', 'dinov2_vits14.safetensors')


@pytest.fixture(scope='session')
def plain_vits(vits_checkpoint: Path) -> torch.nn.Module:
    """The plain timm model with the real weights, built the way ../shared/README.md says."""
    model = timm.create_model('vit_small_patch14_dinov2', img_size=518, dynamic_img_size=True, num_classes=0)
    model.load_state_dict(load_file(str(vits_checkpoint)), strict=True)
    return model.eval()


@pytest.fixture(scope='session')
def sample_images() -> list:
    """Paths of the five real sample photos."""
    return [shared_path('data', 'samples', name) for name in SAMPLES]


@pytest.fixture(scope='session')
def photos(sample_images) -> torch.Tensor:
    """The sample photos as a normalised, non-square batch (5, 3, 266, 350): a 19x25 patch grid."""
    from dvt_timm.data import load_batch
    cfg = timm.get_pretrained_cfg('vit_small_patch14_dinov2.lvd142m')
    return load_batch(sample_images, (266, 350), cfg.mean, cfg.std)
