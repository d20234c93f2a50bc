"""Stage 1: views and coordinates, ground-truth recovery, the API on real photos, the folder CLI."""
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import require_triton
from dvt_timm import DenoisedViT
from dvt_timm.cli import main as cli_main
from dvt_timm.data import image_to_tensor, list_images, load_image
from dvt_timm.fields import (
    PRESETS, FieldSettings, HashGridConfig, decompose, denoise_image, denoise_images, extract_view_features, image_seed,
    sample_indices)
from dvt_timm.fields import pipeline
from dvt_timm.fields.outputs import read_stage1, write_stage1
from dvt_timm.fields.views import View, render_views, sample_views, view_coords
from dvt_timm.precision import bf16_is_native


def test_view_coordinates_follow_the_crop():
    views = [View.full(224), View(28, 56, 112, 84, False), View(28, 56, 112, 84, True)]
    c = view_coords(views, 224, 16)
    assert c.shape == (3, 16, 16, 2)
    torch.testing.assert_close(c[0, 0, :, 0], torch.linspace(0, 1, 16))  # full view: x along columns
    torch.testing.assert_close(c[0, :, 0, 1], torch.linspace(0, 1, 16))  # y along rows
    torch.testing.assert_close(c[1, 0, :, 0], torch.linspace(56 / 224, 140 / 224, 16))
    torch.testing.assert_close(c[1, :, 0, 1], torch.linspace(28 / 224, 140 / 224, 16))
    torch.testing.assert_close(c[2, ..., 0], c[1, ..., 0].flip(-1))  # a flip mirrors x only
    torch.testing.assert_close(c[2, ..., 1], c[1, ..., 1])


def test_view_sampler_matches_random_resized_crop_ranges():
    views = sample_views(400, 448, torch.Generator().manual_seed(0))
    assert views[0] == View.full(448) and len(views) == 401
    areas = torch.tensor([v.height * v.width / 448 ** 2 for v in views[1:]])
    ratios = torch.tensor([v.width / v.height for v in views[1:]])
    assert areas.min() > 0.09 and areas.max() < 0.52  # (0.1, 0.5) up to rounding
    assert ratios.min() > 0.7 and ratios.max() < 1.4
    assert 0.4 < sum(v.flip for v in views) / 400 < 0.6
    assert all(v.top + v.height <= 448 and v.left + v.width <= 448 for v in views)
    # rendering: a crop of a horizontal ramp is the ramp over the crop's columns, mirrored when flipped
    ramp = torch.linspace(0, 1, 448).expand(3, 448, 448)
    pix = render_views(ramp, [View(0, 112, 224, 224, False), View(0, 112, 224, 224, True)])
    assert pix.shape == (2, 3, 448, 448)
    assert abs(pix[0, 0, 0, 0] - 112 / 447) < 0.01 and abs(pix[0, 0, 0, -1] - 335 / 447) < 0.01
    torch.testing.assert_close(pix[1], pix[0].flip(-1))


def test_sample_indices_are_per_image_and_uniform():
    seeds = torch.tensor([image_seed(0, 'a'), image_seed(0, 'b')])
    idx = sample_indices(seeds, 3, 50000, 1000)
    assert idx.min() >= 0 and idx.max() < 1000
    assert torch.equal(sample_indices(seeds[1:], 3, 50000, 1000)[0], idx[1])  # independent of the batch
    counts = torch.bincount(idx[0], minlength=1000).float()
    assert abs(counts.std() / counts.mean() - 50 ** -0.5) < 0.02  # the spread of Poisson(50) counts
    assert not torch.equal(idx[0], idx[1]) and not torch.equal(idx, sample_indices(seeds, 4, 50000, 1000))


def _smooth_field(C: int, generator: torch.Generator, rank: int = 8):
    """A smooth C-channel field of (x, y): low-frequency sinusoids in `rank` latent channels, mixed into C.

    Low rank like real ViT semantics; F's MLP (enc -> C/2 -> C) can only output a C/2-dim subspace."""
    freqs = torch.randn(3, rank, 2, generator=generator) * 1.5
    phase = torch.rand(3, rank, generator=generator) * 2 * math.pi
    amp = torch.rand(3, rank, generator=generator) + 0.5
    mix = torch.randn(rank, C, generator=generator) / rank ** 0.5

    def field(coords: torch.Tensor) -> torch.Tensor:
        arg = torch.einsum('...d,kcd->...kc', coords, freqs) * 2 * math.pi + phase
        return (amp * torch.sin(arg)).sum(-2) @ mix
    return field


def _centred_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean((0, 1)), b - b.mean((0, 1))
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _recover_ground_truth(full_view_share: float, sparse_table_adam: bool, device: str, backend: str) -> None:
    """Views of F* (smooth, image coordinates) + G* (fixed, view position) + noise, through the same crop
    and flip machinery; F and G must come back (centred) with cosine >= 0.95."""
    g = torch.Generator().manual_seed(0)
    size, K, C, n_views = 224, 16, 32, 48
    views = sample_views(n_views, size, g)
    coords = view_coords(views, size, K)  # (V, K, K, 2)
    F_true, G_true = _smooth_field(C, g), torch.randn(K, K, C, generator=g)
    y = F_true(coords) + G_true + 0.05 * torch.randn(len(views), K, K, C, generator=g)
    settings = FieldSettings(image_size=size, n_views=n_views, iterations=800, samples_per_step=1024,
                             full_view_share=full_view_share, sparse_table_adam=sparse_table_adam,
                             hash=HashGridConfig(n_levels=8, log2_hashmap_size=12, base_resolution=4,
                                                 finest_resolution=64))
    out = decompose(y[None].to(device), coords[None], [image_seed(0, 'synthetic')], settings, backend=backend,
                    keep_views=True)[0]
    print(f'G cos {_centred_cos(out.artifact, G_true):.4f}, F cos {_centred_cos(out.denoised, F_true(coords[0])):.4f}')
    assert _centred_cos(out.artifact, G_true) >= 0.95
    assert _centred_cos(out.denoised, F_true(coords[0])) >= 0.95
    assert torch.equal(out.raw, y[0])
    # keep_views (`--save-views`): every view's raw features, and F* at that view's image coordinates
    assert torch.equal(out.view_raw, y) and torch.equal(out.view_denoised[0], out.denoised)
    assert _centred_cos(out.view_denoised.reshape(-1, 1, C), F_true(coords).reshape(-1, 1, C)) >= 0.95
    assert not any(t.requires_grad for t in (out.raw, out.denoised, out.artifact, out.residual, out.view_denoised))


def test_keep_views_gives_every_view_past_one_chunk():
    """keep_views evaluates F 64 views at a time: with more views every one is still there, in order."""
    g = torch.Generator().manual_seed(0)
    K, C, size = 2, 8, 28
    views = sample_views(69, size, g)  # 70 views: two chunks
    coords = view_coords(views, size, K)
    settings = FieldSettings(image_size=size, n_views=69, iterations=2, samples_per_step=16,
                             hash=HashGridConfig(n_levels=2, log2_hashmap_size=8, base_resolution=4,
                                                 finest_resolution=8))
    y = torch.randn(1, len(views), K, K, C, generator=g)
    out = decompose(y, coords[None], [1], settings, backend='torch', keep_views=True)[0]
    assert out.view_denoised.shape == (70, K, K, C) and torch.equal(out.view_raw, y[0])
    assert torch.equal(out.view_denoised[0], out.denoised)
    # views 0 and 69 are different crops of one field: their F differ wherever their coordinates do
    assert not torch.equal(out.view_denoised[69], out.view_denoised[0])


@pytest.mark.parametrize('full_view_share, sparse_table_adam', [
    (0.0, True), (0.5, True),  # the paper's sampling; the fast preset's
    (0.0, False), (0.5, False)])  # the table stepped by a dense Adam: the authors' code; the fast preset's
def test_ground_truth_decomposition_is_recovered(full_view_share, sparse_table_adam):
    """Also when half of the samples come from the full view, with either table optimizer."""
    _recover_ground_truth(full_view_share, sparse_table_adam, 'cpu', 'torch')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('sparse_table_adam', [True, False])
def test_ground_truth_decomposition_is_recovered_on_cuda(sparse_table_adam):
    """The GPU path: our Triton hash-grid kernels, and the fused HashTableAdam step or torch's dense Adam."""
    require_triton()
    _recover_ground_truth(0.0, sparse_table_adam, 'cuda', 'triton')


def test_field_settings_reject_values_that_would_train_nothing():
    with pytest.raises(ValueError, match='full_view_share'):
        FieldSettings(full_view_share=1.5)
    for name in ('iterations', 'samples_per_step', 'n_views'):
        with pytest.raises(ValueError, match=f'{name} must be at least 1, got 0'):
            FieldSettings(**{name: 0})
    for lr in (0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match='lr must be a finite number above 0'):
            FieldSettings(lr=lr)
    for bad, message in ((dict(final_lr_frac=-1), r'final_lr_frac must be in \[0, 1\], got -1'),
                         (dict(warmup_frac=2), r'warmup_frac must be in \[0, 1\]'),
                         (dict(crop_scale=(0.5, 0.1)), r'crop_scale must be \(min, max\) with 0 < min <= max <= 1'),
                         (dict(crop_scale=(0.1, 3.0)), 'crop_scale must be'),
                         (dict(iterations=2.5), 'iterations must be an integer, got 2.5'),
                         (dict(image_size='28'), "image_size must be an integer, got '28'"),
                         (dict(amp='no'), "amp must be True, False or None .* got 'no'")):
        with pytest.raises(ValueError, match=message):
            FieldSettings(**bad)


def test_denoise_images_names_bad_arguments(plain_vits):
    with pytest.raises(ValueError, match=r"unknown settings preset 'fastt'; use one of \['fast', 'paper'\]"):
        denoise_image(plain_vits, torch.zeros(3, 28, 28), settings='fastt')
    for images in ([], 'photo.jpg'):  # a path is one image: denoise_image, not a string to iterate over
        with pytest.raises(ValueError, match='images must be a non-empty list'):
            denoise_images(plain_vits, images, settings='fast')
    with pytest.raises(ValueError, match='expected a normalised float .* got torch.uint8'):
        denoise_image(plain_vits, torch.zeros(3, 28, 28, dtype=torch.uint8), settings='fast')
    with pytest.raises(ValueError, match='holds NaN or inf'):
        denoise_image(plain_vits, torch.full((3, 28, 28), float('nan')), settings='fast')
    with pytest.raises(TypeError, match='expected an image path, a PIL image or a normalised .* got ndarray'):
        denoise_image(plain_vits, torch.zeros(28, 28, 3).numpy(), settings='fast')
    image = torch.zeros(3, 28, 28)
    for kwargs, error, message in ((dict(settings={}), TypeError, 'settings must be a preset name .* got dict'),
                                   (dict(settings=''), ValueError, "unknown settings preset ''"),
                                   (dict(backend='torhc'), ValueError, "unknown backend 'torhc'"),
                                   (dict(progress=True), TypeError, 'progress must be a callable'),
                                   (dict(keys='a'), TypeError, "keys must be a list .* got the string 'a'")):
        with pytest.raises(error, match=message):  # all before any feature extraction
            denoise_image(plain_vits, image, **kwargs)


@pytest.mark.skipif(platform.machine() != 'x86_64' or not Path('/proc/cpuinfo').exists(),
                    reason='reads the CPU flags of x86-64 Linux')
def test_bf16_is_native_follows_the_cpu_flags():
    """bf16 autocast is only chosen on CPUs with bf16 instructions; on others (AVX2-only x86, most AMD Zen 2/3
    servers) it is several times slower than fp32."""
    flags = set(re.search(r'^flags\s*:(.*)$', Path('/proc/cpuinfo').read_text(), re.M).group(1).split())
    assert bf16_is_native('cpu') == bool(flags & {'avx512_bf16', 'amx_tile'})
    assert not bf16_is_native('meta')


def test_stage1_extracts_in_bf16_only_where_bf16_is_native(plain_vits, sample_images, monkeypatch):
    """Left unset (as in both presets), `amp` follows the device: the raw maps are the fp32 features on a CPU
    without native bf16, the bf16-autocast ones where it is native. A request for bf16 where it is slow warns."""
    image = load_image(sample_images[0])
    cfg = plain_vits.pretrained_cfg
    x = image_to_tensor(image, 56, cfg['mean'], cfg['std'])[None]
    expected = {amp: extract_view_features(plain_vits, x, amp=amp)[0] for amp in (False, True)}
    assert (expected[True] - expected[False]).abs().max() > 1e-2  # the two are told apart
    tiny = PRESETS['fast'].with_overrides(image_size=56, n_views=1, iterations=2)
    for native in (False, True):
        monkeypatch.setattr(pipeline, 'bf16_is_native', lambda device, native=native: native)
        assert pipeline.resolve_settings('fast', 14).amp is native and PRESETS['fast'].amp is None
        assert pipeline.resolve_settings(replace(tiny, amp=False), 14).amp is False  # a choice is kept
        assert torch.equal(denoise_image(plain_vits, image, settings=tiny).raw, expected[native])
    monkeypatch.setattr(pipeline, 'bf16_is_native', lambda device: False)
    with pytest.warns(UserWarning, match='bf16 autocast on cpu, which has no native bf16'):
        assert pipeline.resolve_settings(replace(tiny, amp=True), 14).amp is True


def test_denoise_image_leaves_the_callers_model_in_its_mode():
    model = timm.create_model('vit_small_patch14_dinov2', img_size=28, num_classes=0).train()
    tiny = FieldSettings(image_size=28, n_views=1, iterations=2, samples_per_step=8)
    out = denoise_image(model, torch.zeros(3, 28, 28), settings=tiny)
    assert model.training and out.denoised.shape == (2, 2, 384)
    with pytest.raises(ValueError, match=r'takes only 28x28 images, but stage 1 feeds it 56x56 views; .*'
                                         'dynamic_img_size=True'):  # named, not timm's AssertionError
        denoise_image(model, torch.zeros(3, 28, 28), settings=replace(tiny, image_size=56))
    with pytest.raises(ValueError, match='ResNet is not a ViT with patch tokens'):
        denoise_image(timm.create_model('resnet18'), torch.zeros(3, 28, 28), settings='fast')


def test_denoise_images_cli_fails_when_no_image_could_be_processed(tmp_path, vits_checkpoint, capsys):
    (tmp_path / 'list.txt').write_text('missing1.jpg\nmissing2.jpg\n')
    args = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
            '--images', str(tmp_path / 'list.txt'), '--out', str(tmp_path / 'out'), '--preset', 'fast']
    assert cli_main(args) == 1  # so that a script can tell
    captured = capsys.readouterr()
    assert '0 done, 0 skipped (already done), 2 failed' in captured.out
    assert 'none of the 2 images could be processed' in captured.err


def test_denoise_images_cli_never_writes_a_diverged_result(tmp_path, sample_images, vits_checkpoint, capsys):
    """Fields that diverge to NaN are counted failed and not written: a file would mark the image done, and
    stage 2 would refuse it later. A re-run tries them again."""
    args = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
            '--images', str(sample_images[0]), '--out', str(tmp_path / 'out'), '--preset', 'fast', '--views', '1',
            '--iterations', '3', '--image-size', '56', '--lr', '1e30']
    for _ in range(2):
        assert cli_main(args) == 1
        printed = capsys.readouterr()
        assert '0 done, 0 skipped (already done), 1 failed' in printed.out
        assert 'stage 1 gave NaN or Inf features (diverged; try a lower --lr)' in printed.out
        assert not list((tmp_path / 'out').iterdir())
    with pytest.raises(SystemExit):
        cli_main([*args[:-1], 'inf'])
    assert 'must be a number above 0, got inf' in capsys.readouterr().err


def test_denoise_images_cli_rank_with_only_bad_images_lets_the_others_finish(tmp_path, vits_checkpoint, monkeypatch,
                                                                           capsys, caplog):
    """Under torchrun, a rank whose share is all unreadable exits 0 with a warning: an error would make
    torchrun stop the ranks still working."""
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    (tmp_path / 'list.txt').write_text('missing1.jpg\nmissing2.jpg\n')
    args = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
            '--images', str(tmp_path / 'list.txt'), '--out', str(tmp_path / 'out'), '--preset', 'fast',
            '--batch-images', '1']
    assert cli_main(args) == 0
    assert '0 done, 0 skipped (already done), 1 failed' in capsys.readouterr().out  # rank 1's share: missing2
    assert 'none of the 1 images of this rank could be processed' in caplog.text


def test_denoise_images_cli_checks_the_backend_before_any_work(tmp_path, capsys):
    """A backend that cannot run here is named before the backbone loads, not after minutes of extraction."""
    from dvt_timm.fields.encoding import has_tcnn
    if has_tcnn():
        pytest.skip('tinycudann is importable here')
    args = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint',
            str(tmp_path / 'not_read.safetensors'), '--images', str(tmp_path), '--out', str(tmp_path / 'out'),
            '--preset', 'fast', '--backend', 'tcnn']
    (tmp_path / 'photo.jpg').write_bytes(b'not read either')
    assert cli_main(args) == 1
    assert "backend 'tcnn' requested but tinycudann is not importable" in capsys.readouterr().err


def _run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'dvt_timm.cli', 'denoise-images', *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture()
def image_folder(tmp_path, sample_images):
    folder = tmp_path / 'images'
    folder.mkdir()
    for p in sample_images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / 'broken.jpg').write_bytes(b'not an image')
    return folder


def test_denoise_images_under_torchrun_shares_the_images(tmp_path, sample_images, vits_checkpoint):
    """Two ranks take alternate groups of images; together they write what one process writes, bit for bit."""
    (tmp_path / 'list.txt').write_text(''.join(f'{p.resolve()}\n' for p in sample_images[:4]))
    common = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
              '--images', str(tmp_path / 'list.txt'), '--preset', 'fast', '--views', '2', '--iterations', '20',
              '--image-size', '56', '--batch-images', '1', '--dtype', 'fp32']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # the same float results in every process
    one = subprocess.run([sys.executable, '-m', 'dvt_timm.cli', *common, '--out', str(tmp_path / 'one')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          '-m', 'dvt_timm.cli', *common, '--out', str(tmp_path / 'two')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count('stage 1: 2 done, 0 skipped (already done), 0 failed') == 2  # each rank its half
    names = sorted(p.name for p in (tmp_path / 'one').glob('*.safetensors'))
    assert len(names) == 4 and sorted(p.name for p in (tmp_path / 'two').iterdir()) == names  # no temp files
    for name in names:
        a, b = read_stage1(tmp_path / 'one' / name), read_stage1(tmp_path / 'two' / name)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name


def test_denoise_images_cli_resumes_after_kill(tmp_path, image_folder, vits_checkpoint):
    """Kill the CLI mid-run and run it again: finished images are not recomputed, no partial files remain,
    the unreadable image is logged and skipped, and results equal an uninterrupted run's bit for bit."""
    common = ['--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', vits_checkpoint,
              '--images', image_folder, '--preset', 'fast', '--views', 3, '--iterations', 150,
              '--image-size', 112, '--batch-images', 2, '--dtype', 'fp32']
    killed = tmp_path / 'killed'
    proc = _run_cli([*common, '--out', killed])
    deadline = time.time() + 240
    while not list(killed.glob('*.safetensors')) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in killed.glob('*.safetensors')}
    assert 0 < len(first) < 5, 'the run was not interrupted mid-way'

    resumed = _run_cli([*common, '--out', killed])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f'{5 - len(first)} done, {len(first)} skipped (already done), 1 failed' in log
    assert 'broken.jpg' in log
    assert {p.name: p.stat().st_mtime_ns for p in killed.glob('*.safetensors') if p.name in first} == first
    assert not list(killed.glob('.*')), 'temp files left behind'

    clean = tmp_path / 'clean'
    full = _run_cli([*common, '--out', clean])
    assert full.communicate(timeout=300)[0] and full.returncode == 0
    names = sorted(p.name for p in clean.glob('*.safetensors'))
    assert names == sorted(p.name for p in killed.glob('*.safetensors')) and len(names) == 5
    for name in names:
        raw_a, den_a, item = read_stage1(killed / name)
        raw_b, den_b, _ = read_stage1(clean / name)
        assert torch.equal(raw_a, raw_b) and torch.equal(den_a, den_b), name
    assert raw_a.shape == (8, 8, 384)
    assert item.model == 'vit_small_patch14_dinov2' and item.input_size == (112, 112) and item.patch_size == 14
    assert json.loads(item.metadata['settings'])['amp'] is bf16_is_native('cpu')  # what was used, not "auto"

    # The files hold what the library API gives for that image: its raw map and its field F. The API is given
    # the image's group as the CLI formed it (sorted, --batch-images 2, the unreadable file dropped): CPU
    # kernels round differently with the batch size, which 150 optimisation steps make visible in F.
    stem = Path(name).stem
    listed = list_images(image_folder)
    k = 2 * ([p.stem for p in listed].index(stem) // 2)
    group = [p for p in listed[k:k + 2] if p.name != 'broken.jpg']
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=vits_checkpoint)
    settings = PRESETS['fast'].with_overrides(n_views=3, iterations=150, image_size=112)
    keys = [p.stem for p in group]
    api = denoise_images(model, group, settings=settings, keys=keys)[keys.index(stem)]
    torch.testing.assert_close(raw_a, api.raw, rtol=0, atol=1e-5)
    torch.testing.assert_close(den_a, api.denoised, rtol=1e-4, atol=1e-4)
    assert (den_a - raw_a).norm() > 0.05 * raw_a.norm()  # F is not the raw map


def test_denoise_images_cli_save_views_writes_a_training_pair_per_view(tmp_path, sample_images, vits_checkpoint,
                                                                      capsys):
    """--save-views: OUT/views/<stem>_viewNNN.safetensors per view (000 the full image, the same maps as
    OUT/<stem>.safetensors), a stage-1 folder of its own; an image whose views are missing is redone."""
    out = tmp_path / 'out'
    args = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
            '--images', str(sample_images[0]), '--out', str(out), '--preset', 'fast', '--views', '2',
            '--iterations', '4', '--image-size', '56', '--save-views']
    assert cli_main(args) == 0
    stem = sample_images[0].stem
    assert sorted(p.name for p in (out / 'views').iterdir()) == [f'{stem}_view{v:03d}.safetensors' for v in range(3)]
    raw, denoised, _ = read_stage1(out / f'{stem}.safetensors')
    views = [read_stage1(out / 'views' / f'{stem}_view{v:03d}.safetensors') for v in range(3)]
    assert torch.equal(views[0][0], raw) and torch.equal(views[0][1], denoised)
    assert not torch.equal(views[1][0], raw) and not torch.equal(views[1][1], denoised)  # a crop, not the full image
    assert [item.metadata['view'] for _, _, item in views] == ['0', '1', '2']
    assert {item.metadata['image'] for _, _, item in views} == {str(sample_images[0])}  # held out together
    capsys.readouterr()
    assert cli_main(args) == 0 and '0 done, 1 skipped' in capsys.readouterr().out
    (out / 'views' / f'{stem}_view002.safetensors').unlink()
    (out / 'views' / f'.{stem}_view002.safetensors.x1y2.tmp').write_bytes(b'half')  # as a killed write leaves it
    assert cli_main(args) == 0 and '1 done, 0 skipped' in capsys.readouterr().out
    assert (out / 'views' / f'{stem}_view002.safetensors').is_file() and not list((out / 'views').glob('.*'))


def test_denoise_images_cli_keeps_inputs_and_refuses_to_mix_settings(tmp_path, sample_images, vits_checkpoint, capsys):
    """Outputs (and visuals) written into the image folder itself never overwrite an input or get read back
    as inputs; an unreadable output is redone; a re-run with other settings stops instead of mixing runs."""
    from dvt_timm.cli import main
    folder = tmp_path / 'photos'
    folder.mkdir()
    inputs = {p.name: p.read_bytes() for p in sample_images[:2]}
    for name, data in inputs.items():
        (folder / name).write_bytes(data)
    common = ['denoise-images', '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint', str(vits_checkpoint),
              '--images', str(folder), '--out', str(folder), '--preset', 'fast', '--views', '1', '--iterations', '2',
              '--dtype', 'fp32']

    def run(*extra):
        code = main([*common, *extra])
        return code, capsys.readouterr()

    code, printed = run('--image-size', '56', '--save-visuals')
    assert code == 0 and '2 done, 0 skipped (already done), 0 failed' in printed.out
    assert {name: (folder / name).read_bytes() for name in inputs} == inputs
    assert sorted(p.name for p in (folder / 'visuals').iterdir()) == sorted(f'{Path(n).stem}.png' for n in inputs)
    code, printed = run('--image-size', '56', '--save-visuals')
    assert code == 0 and '0 done, 2 skipped (already done), 0 failed' in printed.out
    code, printed = run('--image-size', '56', '--model', 'dvt_vit_small_patch14_dinov2')  # the same backbone
    assert code == 0 and '0 done, 2 skipped (already done), 0 failed' in printed.out
    stem = Path(sorted(inputs)[0]).stem
    (folder / f'{stem}.safetensors').write_bytes(b'garbage')
    code, printed = run('--image-size', '56')
    assert code == 0 and '1 done, 1 skipped (already done), 0 failed' in printed.out
    assert read_stage1(folder / f'{stem}.safetensors')[2].input_size == (56, 56)
    code, printed = run('--image-size', '28')
    assert code == 1 and "was made with other settings than this run (input_size '56,56', now '28,28'; " \
                         "image_size 56, now 28)" in printed.err
    # Other backbone weights under the same name, or another picture under the same file name, are not mixed in.
    tuned = {k: v.clone() for k, v in load_file(str(vits_checkpoint)).items()}
    tuned['norm.bias'] += 0.01
    save_file(tuned, str(tmp_path / 'tuned.safetensors'))
    code, printed = run('--image-size', '56', '--backbone-checkpoint', str(tmp_path / 'tuned.safetensors'))
    assert code == 1 and re.search(r"other settings .*\(backbone_weights 'sha256:\w+', now 'sha256:", printed.err)
    (folder / sorted(inputs)[0]).write_bytes(sample_images[2].read_bytes())
    code, printed = run('--image-size', '56')
    assert code == 1 and f'was made from another picture ({folder / sorted(inputs)[0]}) than ' in printed.err
    (folder / sorted(inputs)[0]).write_bytes(inputs[sorted(inputs)[0]])
    # Outputs written before `sparse_table_adam` existed were made with the dense Adam: the fast preset (dense)
    # resumes them, a run with the sparse one names the difference. Those written before the backbone's weights
    # were recorded are taken as made with these.
    for path in folder.glob('*.safetensors'):
        raw, denoised, item = read_stage1(path)
        settings = json.loads(item.metadata['settings'])
        del settings['sparse_table_adam']
        meta = {k: v for k, v in item.metadata.items() if k != 'backbone_weights'}
        write_stage1(path, raw, denoised, {**meta, 'settings': json.dumps(settings, sort_keys=True)}, torch.float32)
    code, printed = run('--image-size', '56')
    assert code == 0 and '0 done, 2 skipped (already done), 0 failed' in printed.out
    code, printed = run('--image-size', '56', '--sparse-table-adam')
    assert code == 1 and 'other settings than this run (sparse_table_adam False, now True)' in printed.err
    with pytest.raises(SystemExit):
        main([*common, '--batch-images', '0'])
    assert 'must be at least 1, got 0' in capsys.readouterr().err
