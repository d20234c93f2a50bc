"""The examples run as written (with small settings) and do what they say."""
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import shared_path

EXAMPLES = Path(__file__).resolve().parent.parent / 'examples'


def _run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, DVT_SHARED=str(shared_path().resolve()))  # the scripts run in another folder
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_assets_are_the_shared_samples():
    for name in ('chelsea.png', 'astronaut.png', 'coffee.png', 'rocket.jpg', 'grace_hopper.jpg'):
        assert (EXAMPLES / 'assets' / name).is_file(), name


def test_quickstart(tmp_path):
    shared_path('weights', 'dinov2_vits14.safetensors')
    out = _run('quickstart.py', '--size', '112', cwd=tmp_path)
    assert '(1, 384, 8, 8)' in out and 'wrote quickstart_pca.png' in out
    with Image.open(tmp_path / 'quickstart_pca.png') as img:  # input | PCA raw | PCA denoised
        assert img.size == (3 * 336, 336)


def test_probe_segmentation(tmp_path):
    shared_path('data', 'voc_val_samples')
    out = _run('probe_segmentation.py', '--size', '112', '--limit', '5', '--probe-steps', '10', cwd=tmp_path)
    assert '5 images' in out and 'knn-centroid' in out and 'linear' in out and 'mIoU %' in out
    assert 'probe: 3 training / 2 held-out images' in out


def test_train_your_own(tmp_path):
    """Image folder -> stage 1 -> stage 2 -> a denoiser that loads with from_pretrained (tiny settings)."""
    shared_path('weights', 'dinov2_vits14.safetensors')
    out = _run('train_your_own.py', '--out', 'run', '--views', '2', '--iterations', '20', '--image-size', '112',
               '--epochs', '2', cwd=tmp_path)  # the default batch fits the bundled photos
    assert 'stage 1: 5 done, 0 skipped (already done), 0 failed' in out
    assert 'stage 2: 2 steps' in out and 'loaded run/denoiser' in out and '(1, 384, 8, 8)' in out
    assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in (tmp_path / 'run' / 'denoiser').iterdir()}
