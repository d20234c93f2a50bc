"""Stage-2 training: data scan, batch order, loss, resume after a hard kill, DDP equivalence, outputs.

Synthetic stage-1 folders stand in for real ones: raw = content + P and denoised = content, for a
fixed positional pattern P, so a denoiser can only fit the held-out files by learning P from the
positions -- the held-out loss must fall well below that of returning raw unchanged. Width 384 fits
a real ViT-S/14 so the result loads into `DenoisedViT`; grids are 8x8 (and 6x10) tokens for speed.
"""
import hashlib
import json
import math
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dvt_timm import DenoisedViT
from dvt_timm.checkpoint import DenoiserConfig, read_denoiser_checkpoint, write_denoiser_checkpoint
from dvt_timm.denoiser import Denoiser
from dvt_timm.losses import distance
from dvt_timm.training import commands, trainer
from dvt_timm.training.data import (
    Stage1Dataset, Stage1Error, eval_batches, global_batches, rank_slice, scan_stage1, split_files, steps_per_epoch,
)
from dvt_timm.training.trainer import (
    DistEnv, TrainConfig, _check_config, default_lr, lr_at, train,
)

BACKBONE = 'vit_small_patch14_dinov2.lvd142m'
C = 384
REPO = Path(__file__).resolve().parents[1]

# One run's settings, shared by the reference, killed/resumed and 2-process runs.
RUN = dict(model='dvt_vit_small_patch14_dinov2', steps=12, batch_size=4, lr=2e-3, val_frac=0.125,
           val_every=4, ckpt_every=4, log_every=1, seed=3)


def _meta(grid, model=BACKBONE, **over):
    meta = {'format': 'dvt-timm-stage1', 'format_version': '1', 'model': model,
            'input_size': f'{grid[0] * 14},{grid[1] * 14}', 'patch_size': '14', 'settings': '{}'}
    meta.update(over)
    return meta


def write_stage1(root: Path, counts: dict, seed: int = 0, dtype=torch.float16) -> torch.Tensor:
    """Write `counts[grid]` files per grid with raw = content + P, denoised = content; returns P (37x37)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(1, C, 37, 37, generator=g)  # one smooth-enough field, sampled per grid
    i = 0
    for grid, n in counts.items():
        p = torch.nn.functional.interpolate(pattern, size=grid, mode='bilinear', align_corners=True)
        p = p[0].permute(1, 2, 0)
        for _ in range(n):
            content = torch.randn(*grid, C, generator=g)
            save_file({'raw': (content + p).to(dtype), 'denoised': content.to(dtype)},
                      str(root / f'img{i:03d}.safetensors'), metadata=_meta(grid))
            i += 1
    return pattern


def write_bad_files(root: Path) -> dict:
    """Files the scan must skip, by name -> a word its reason must contain."""
    good = {'raw': torch.zeros(8, 8, C, dtype=torch.float16), 'denoised': torch.zeros(8, 8, C, dtype=torch.float16)}
    (root / 'junk.safetensors').write_bytes(b'not a safetensors file at all')
    save_file(good, str(root / 'trunc.safetensors'), metadata=_meta((8, 8)))
    data = (root / 'trunc.safetensors').read_bytes()
    (root / 'trunc.safetensors').write_bytes(data[:len(data) // 2])
    save_file(good, str(root / 'otherformat.safetensors'), metadata=_meta((8, 8), format='something-else'))
    save_file({'raw': good['raw']}, str(root / 'noclean.safetensors'), metadata=_meta((8, 8)))
    save_file({'raw': good['raw'], 'denoised': good['denoised'][:4]}, str(root / 'shape.safetensors'),
              metadata=_meta((8, 8)))
    save_file(good, str(root / 'future.safetensors'), metadata=_meta((8, 8), format_version='2'))
    save_file(good, str(root / 'wronggrid.safetensors'), metadata=_meta((8, 8), input_size='224,224'))
    save_file({'raw': torch.zeros(8, 8, 768), 'denoised': torch.zeros(8, 8, 768)}, str(root / 'vitb.safetensors'),
              metadata=_meta((8, 8), model='vit_base_patch14_dinov2.lvd142m'))
    return {'junk': 'safetensors', 'trunc': 'safetensors', 'otherformat': 'format', 'noclean': 'denoised',
            'shape': 'shape', 'future': 'newer', 'wronggrid': 'input_size', 'vitb': 'vit_base'}


@pytest.fixture(scope='module')
def stage1_dir(tmp_path_factory) -> Path:
    """24 files on an 8x8 grid, 8 on 6x10 (different input size), and every kind of bad file."""
    root = tmp_path_factory.mktemp('stage1')
    write_stage1(root, {(8, 8): 24, (6, 10): 8})
    write_bad_files(root)
    return root


def _config(data: Path, out: Path, **over) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**RUN, 'workers': 0, 'device': 'cpu', **over})


def _cli_args(data: Path, out: Path, **over) -> list:
    args = ['--data', str(data), '--out', str(out), '--device', 'cpu']
    for key, value in {**RUN, 'workers': 0, **over}.items():
        args += [f'--{key.replace("_", "-")}', str(value)]
    return args


def _env(threads: int = 0) -> dict:
    # By default the CPU thread count of this process: a run's float results depend on it.
    return {**os.environ, 'OMP_NUM_THREADS': str(threads or torch.get_num_threads()), 'PYTHONPATH': str(REPO)}


def _log(out: Path) -> list:
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def reference_run(stage1_dir, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (with a data-loading worker, which must not change anything)."""
    out = tmp_path_factory.mktemp('ref') / 'run'
    train(_config(stage1_dir, out, workers=1))
    return out


# ---------------------------------------------------------------------------- pure functions
def test_schedule_follows_the_authors_recipe():
    assert default_lr(256) == pytest.approx(2e-4)
    assert default_lr(64) == pytest.approx(1e-4)
    total, peak = 100, 1e-3
    lrs = [lr_at(s, total, peak, 0.15, 1e-6) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / 15) and lrs[14] == pytest.approx(peak)  # 15 warm-up steps
    assert all(a < b for a, b in zip(lrs[:14], lrs[1:15]))
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:]))  # cosine: monotone down
    assert lrs[-1] == pytest.approx(1e-6)
    assert lrs[15 + 42] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 42 / 84)))


def test_distance_is_mse_plus_one_minus_cosine():
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    expected = ((a - b) ** 2).mean() + 1 - cos.mean()
    assert distance(a, b).mean().item() == pytest.approx(expected.item(), rel=1e-5)
    assert distance(a, b).shape == (a.shape[0],)
    assert distance(a, a).abs().max().item() == pytest.approx(0, abs=1e-6)


def test_batch_order_is_the_same_for_any_world_size():
    grids = [(8, 8)] * 21 + [(6, 10)] * 9
    batches = global_batches(grids, 4, seed=1, epoch=0)
    assert len(batches) == steps_per_epoch(grids, 4) == 5 + 2
    assert all(len(b) == 4 and len({grids[i] for i in b}) == 1 for b in batches)  # one grid per batch
    assert len({i for b in batches for i in b}) == 28  # no repeats
    assert batches == global_batches(grids, 4, seed=1, epoch=0)
    assert batches != global_batches(grids, 4, seed=1, epoch=1)
    assert batches != global_batches(grids, 4, seed=2, epoch=0)
    for world in (2, 4):
        shares = [rank_slice(b, r, world) for b in batches for r in range(world)]
        assert all(len(s) == 4 // world for s in shares)
        for b in batches:
            assert sorted(i for r in range(world) for i in rank_slice(b, r, world)) == sorted(b)
    for world in (1, 2, 3):  # evaluation: every item once over all ranks, one grid per batch
        seen = [i for r in range(world) for b in eval_batches(grids, 4, r, world) for i in b]
        assert sorted(seen) == list(range(30))


def test_split_is_by_file_and_seeded(stage1_dir):
    items = scan_stage1(stage1_dir, log=False).items
    train_a, val_a = split_files(items, 0.125, seed=0)
    train_b, val_b = split_files(items, 0.125, seed=0)
    _, val_c = split_files(items, 0.125, seed=1)
    assert len(val_a) == 4 and len(train_a) == 28
    assert val_a == val_b and train_a == train_b and val_a != val_c
    assert not {i.path for i in val_a} & {i.path for i in train_a}
    assert split_files(items, 0, seed=0)[1] == []


def test_split_holds_out_every_view_of_an_image_together(tmp_path):
    """`denoise-images --save-views` writes one file per view, all recording the same image: a held-out image
    must not have its other views in the training split, or the held-out loss would be on seen images."""
    content = torch.zeros(8, 8, C, dtype=torch.float16)
    for image in range(10):
        for view in range(5):
            save_file({'raw': content, 'denoised': content.clone()}, str(tmp_path / f'im{image}_view{view:03d}.safetensors'),
                      metadata=_meta((8, 8), image=f'/photos/im{image}.jpg', view=str(view)))
    train, val = split_files(scan_stage1(tmp_path, log=False).items, 0.2, seed=0)
    image_of = lambda items: {i.metadata['image'] for i in items}  # noqa: E731
    assert len(image_of(val)) == 2 and len(val) == 10 and len(train) == 40
    assert not image_of(val) & image_of(train)


# ---------------------------------------------------------------------------- data
def test_scan_skips_bad_files_with_reasons(stage1_dir, caplog):
    expected = write_bad_files(stage1_dir)  # idempotent: the fixture wrote the same files
    with caplog.at_level('WARNING'):
        scan = scan_stage1(stage1_dir, model=BACKBONE)
    assert len(scan.items) == 32 and scan.model == BACKBONE and scan.embed_dim == C and scan.patch_size == 14
    reasons = {p.stem: r for p, r in scan.skipped}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        assert f'{name}.safetensors' in caplog.text
    ds = Stage1Dataset(scan.items)
    raw, clean, usable = ds[0]
    assert raw.dtype == clean.dtype == torch.float32 and raw.shape == (8, 8, C) and usable


def test_scan_verify_data_rejects_non_finite(tmp_path):
    write_stage1(tmp_path, {(8, 8): 2})
    t = torch.zeros(8, 8, C)
    t[0, 0, 0] = float('nan')
    save_file({'raw': t, 'denoised': t.clone()}, str(tmp_path / 'nan.safetensors'), metadata=_meta((8, 8)))
    assert len(scan_stage1(tmp_path, log=False).items) == 3  # headers alone cannot tell
    scan = scan_stage1(tmp_path, verify=True, log=False)
    assert len(scan.items) == 2 and 'NaN' in scan.skipped[0][1]


def test_model_must_match_the_data(stage1_dir, tmp_path, capsys):
    with pytest.raises(Stage1Error, match=r'vit_base_patch14_dinov2.*vit_small_patch14_dinov2\.lvd142m'):
        scan_stage1(stage1_dir, model='vit_base_patch14_dinov2', log=False)
    with pytest.raises(Stage1Error, match='no usable stage-1 files'):
        scan_stage1(tmp_path, log=False)
    # The same architecture with other weights (another pretrained tag) is another backbone.
    dino = {'raw': torch.zeros(8, 8, C), 'denoised': torch.zeros(8, 8, C)}
    (tmp_path / 'dino').mkdir()
    for i in range(4):
        save_file(dino, str(tmp_path / 'dino' / f'{i}.safetensors'),
                  metadata=_meta((8, 8), model='vit_small_patch16_224.dino', input_size='128,128', patch_size='16'))
    with pytest.raises(Stage1Error, match=r'vit_small_patch16_224\.augreg_in1k.*vit_small_patch16_224\.dino'):
        train(_config(tmp_path / 'dino', tmp_path / 'tag', model='vit_small_patch16_224.augreg_in1k', batch_size=2))
    with pytest.raises(ValueError, match=r'vit_small_patch14_dinov2\.other: Invalid pretrained tag \(other\)'):
        train(_config(stage1_dir, tmp_path / 'other', model='vit_small_patch14_dinov2.other'))  # no such weights
    assert not (tmp_path / 'other').exists()  # refused before it wrote a config.json that could never load
    # The CLI reports it as an error naming both, without a traceback.
    rc = commands.main(_cli_args(stage1_dir, tmp_path / 'x', model='dvt_vit_large_patch14_dinov2'))
    err = capsys.readouterr().err
    assert rc == 1 and 'vit_large_patch14_dinov2.lvd142m' in err and BACKBONE in err
    assert not (tmp_path / 'x' / 'checkpoint.pt').exists()
    assert commands.main(_cli_args(stage1_dir, tmp_path / 'y', model='vit_smal_patch14_dinov2')) == 1
    assert '--model vit_smal_patch14_dinov2 is not a timm model' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('')  # an --out in the way is a usage error, as under `dvt-timm train-denoiser`
    with pytest.raises(SystemExit) as exit_:
        commands.main(_cli_args(stage1_dir, tmp_path / 'a_file'))
    assert exit_.value.code == 2
    assert 'dvt-timm train-denoiser: error: argument --out: ' in capsys.readouterr().err


def test_denoiser_records_the_size_it_was_trained_at(tmp_path):
    """Features all from 112 px images: config.json and the card say so, and a model loading the result
    gets 112 px as its timm data config, directly and through timm.create_model."""
    import timm

    write_stage1(tmp_path / 'data', {(8, 8): 6})
    out = tmp_path / 'run'
    train(_config(tmp_path / 'data', out, steps=1, batch_size=2, val_frac=0.2, val_every=1, ckpt_every=1))
    assert json.loads((out / 'config.json').read_text())['input_size'] == 112
    assert '| input size of the stage-1 features | 112 px |' in (out / 'README.md').read_text()
    for model in (DenoisedViT(BACKBONE, denoiser_checkpoint=out),
                  timm.create_model('dvt_vit_small_patch14_dinov2', denoiser_checkpoint=out)):
        assert timm.data.resolve_model_data_config(model)['input_size'] == (3, 112, 112)
    overlaid = timm.create_model('dvt_vit_small_patch14_dinov2', denoiser_checkpoint=out,
                                 pretrained_cfg_overlay=dict(input_size=(3, 224, 224)))
    assert timm.data.resolve_model_data_config(overlaid)['input_size'] == (3, 224, 224)  # the caller's wins


def test_bad_settings_are_refused(stage1_dir, tmp_path):
    with pytest.raises(ValueError, match='--epochs or --steps'):
        train(_config(stage1_dir, tmp_path / 'a', epochs=1))
    with pytest.raises(ValueError, match='larger than the 28 training files'):
        train(_config(stage1_dir, tmp_path / 'b', batch_size=64))
    two = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device('cpu'))
    with pytest.raises(ValueError, match=r'multiple of the number of processes \(2\)'):
        _check_config(_config(stage1_dir, tmp_path / 'd', batch_size=5), two)
    _check_config(_config(stage1_dir, tmp_path / 'd', batch_size=6), two)
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
    with pytest.raises(ValueError, match='--eps must be positive, got 0'):
        _check_config(_config(stage1_dir, tmp_path / 'e', eps=0), one)
    for min_lr in (-1e-6, 1.0):  # a negative rate, or a "minimum" above the peak, would train away from F
        with pytest.raises(ValueError, match='--min-lr must be between 0 and the peak learning rate'):
            _check_config(_config(stage1_dir, tmp_path / 'e', min_lr=min_lr), one)


def test_a_non_finite_model_never_replaces_the_last_checkpoint(tmp_path, monkeypatch):
    """With checkpoints more often than loss logs, a NaN that enters between them (a diverging step) must
    not be saved."""
    write_stage1(tmp_path / 'data', {(8, 8): 8})
    real_step, steps = trainer.train_step, []

    def diverging_step(model, *args):
        loss = real_step(model, *args)
        steps.append(loss)
        if len(steps) == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float('nan'))
        return loss

    monkeypatch.setattr(trainer, 'train_step', diverging_step)
    out = tmp_path / 'run'
    with pytest.raises(RuntimeError, match='weights are not finite at step 3'):
        train(_config(tmp_path / 'data', out, steps=8, batch_size=2, val_frac=0, ckpt_every=1, log_every=100))
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['step'] == 2 and all(torch.isfinite(v).all() for v in state['model'].values())


def test_best_holds_the_weights_with_the_lowest_held_out_loss(tmp_path, monkeypatch):
    """When the held-out loss rises again, best/ keeps the weights of its lowest point (timm's model_best);
    a NaN loss is never the lowest."""
    write_stage1(tmp_path / 'data', {(8, 8): 8})
    scripted = iter([0.9, math.nan, 0.3, 0.4])  # the identity baseline, then the validations at steps 2, 4, 6
    seen = {}

    def scripted_evaluate(model, *args):
        if isinstance(model, Denoiser):
            seen[len(seen)] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(scripted)

    monkeypatch.setattr(trainer, 'evaluate', scripted_evaluate)
    out = tmp_path / 'run'
    summary = train(_config(tmp_path / 'data', out, steps=6, batch_size=2, val_frac=0.25, val_every=2,
                            log_every=100))
    assert (summary['best_step'], summary['best_val_loss'], summary['val_loss']) == (4, 0.3, 0.4)
    best, last = load_file(str(out / 'best' / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(best[k], seen[1][k]) for k in best)  # the weights validated at step 4
    assert all(torch.equal(last[k], seen[2][k]) for k in last)
    assert not all(torch.equal(best[k], last[k]) for k in best)
    card = (out / 'best' / 'README.md').read_text()
    assert '| steps | 6 (these weights: step 4) |' in card and '| 0.30000 |' in card
    assert DenoisedViT(BACKBONE, denoiser_checkpoint=out / 'best').denoiser.pos_embed.shape[-1] == C


def test_more_processes_than_gpus_is_named(monkeypatch):
    from dvt_timm.training.trainer import setup_distributed
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for key, value in dict(WORLD_SIZE='4', RANK='3', LOCAL_RANK='3', LOCAL_WORLD_SIZE='4').items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=r'4 processes on this node but torch sees 2 GPU\(s\).*--nproc_per_node 2'):
        setup_distributed('cuda')


def test_best_follows_the_checkpoint_after_a_kill(stage1_dir, tmp_path):
    """best/ is written at each better validation, so a kill can leave it ahead of checkpoint.pt; --resume puts
    back the checkpoint's best/ (--val-every may change on resume, so that validation may never come again).
    A new run in a folder whose last run died before its first checkpoint starts without that run's best/."""
    out = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'dvt_timm.training']
    kill = subprocess.run(cmd + _cli_args(stage1_dir, out, val_every=2, stop_after_steps=7), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['step'] == 4 and state['best'][1] == 4
    assert '(these weights: step 6)' in (out / 'best' / 'README.md').read_text()  # ahead of the checkpoint
    # Resumed without validation, and killed again before anything else is written.
    kill = subprocess.run(cmd + _cli_args(stage1_dir, out, val_every=0, stop_after_steps=5) + ['--resume'],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert kill.returncode == -signal.SIGKILL, kill.stderr[-2000:]
    assert '(these weights: step 4)' in (out / 'best' / 'README.md').read_text()
    best = load_file(str(out / 'best' / 'model.safetensors'))
    assert all(torch.equal(best[k], state['best_weights'][k]) for k in state['best_weights'])

    fresh = tmp_path / 'fresh'
    kill = subprocess.run(cmd + _cli_args(stage1_dir, fresh, val_every=2, ckpt_every=100, stop_after_steps=3),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert kill.returncode == -signal.SIGKILL and (fresh / 'best').is_dir() and not (fresh / 'checkpoint.pt').exists()
    train(_config(stage1_dir, fresh, steps=4, val_frac=0))
    assert not (fresh / 'best').exists()


def test_validation_cadence_does_not_change_the_weights(tmp_path):
    """--val-every may change on --resume (it is not run-defining), so validating must not move the run."""
    write_stage1(tmp_path / 'data', {(8, 8): 16})
    run = dict(steps=6, batch_size=4, val_frac=0.25, log_every=100, workers=1)  # a worker: its seed draw too
    for every in (1, 0):
        train(_config(tmp_path / 'data', tmp_path / f'every{every}', val_every=every, **run))
    often, never = (load_file(str(tmp_path / f'every{e}' / 'model.safetensors')) for e in (1, 0))
    assert all(torch.equal(often[k], never[k]) for k in never)


def test_resume_names_the_files_that_changed(tmp_path):
    write_stage1(tmp_path / 'data', {(8, 8): 8})
    out = tmp_path / 'run'
    run = dict(steps=2, batch_size=2, val_frac=0.25, log_every=100)
    train(_config(tmp_path / 'data', out, **run))
    (tmp_path / 'data' / 'img002.safetensors').rename(tmp_path / 'data' / 'img100.safetensors')
    # One file gone and one new: the split is drawn again from the new set, but the message names the two.
    changed = r"the stage-1 files changed .*\(gone: \['img002.safetensors'\]; new: \['img100.safetensors'\]\)"
    with pytest.raises(ValueError, match=changed):
        train(_config(tmp_path / 'data', out, resume=True, **run))
    # The same names, but one file made from another image: not the run the checkpoint belongs to either.
    (tmp_path / 'data' / 'img100.safetensors').rename(tmp_path / 'data' / 'img002.safetensors')
    raw, clean = (load_file(str(tmp_path / 'data' / 'img002.safetensors'))[k] for k in ('raw', 'denoised'))
    save_file({'raw': raw, 'denoised': clean}, str(tmp_path / 'data' / 'img002.safetensors'),
              metadata={**_meta((8, 8)), 'image': 'another/img002.png'})
    with pytest.raises(ValueError, match='the stage-1 files have the names they had .* but other contents'):
        train(_config(tmp_path / 'data', out, resume=True, **run))


def test_resume_from_a_checkpoint_that_is_not_ours_says_so(tmp_path):
    write_stage1(tmp_path / 'data', {(8, 8): 4})
    out = tmp_path / 'run'
    out.mkdir()
    for content, message in (([1, 2], 'not a dvt-timm training checkpoint'),
                             ({'format': 'dvt-timm-train', 'step': 3}, r"a dvt-timm training checkpoint without \["),
                             (os.system, 'cannot be read .*GLOBAL posix.system')):
        torch.save(content, out / 'checkpoint.pt')
        with pytest.raises(ValueError, match=f'checkpoint.pt.*{message}.*delete it to start over'):
            train(_config(tmp_path / 'data', out, steps=2, batch_size=2, val_frac=0, resume=True))


def test_a_stage1_file_that_goes_bad_is_skipped_with_a_warning(tmp_path, caplog):
    """Without --verify-data files are not read in full when scanned. One found holding NaN when read (or made
    unreadable since the scan) is named and left out of the loss, and the run goes on."""
    write_stage1(tmp_path / 'data', {(8, 8): 8})
    nan_file = tmp_path / 'data' / 'img003.safetensors'
    tensors = load_file(str(nan_file))
    tensors['denoised'][0, 0, 0] = float('nan')
    save_file(tensors, str(nan_file), metadata=_meta((8, 8)))
    run = dict(steps=8, batch_size=2, val_frac=0.25, log_every=1, val_every=4)
    with caplog.at_level('WARNING'):
        summary = train(_config(tmp_path / 'data', tmp_path / 'run', **run))
    assert re.search(r'skipping stage-1 file \S*img003.safetensors: holds NaN or Inf', caplog.text)
    assert summary['steps'] == 8 and math.isfinite(summary['val_loss'])
    log = _log(tmp_path / 'run')
    assert all(math.isfinite(r['loss']) for r in log if r['event'] == 'train')
    # The end of the run counts it with the files skipped when scanned.
    assert [Path(f).name for f, _ in summary['skipped']] == ['img003.safetensors']
    assert log[-1]['event'] == 'done' and log[-1]['skipped_when_read'] == ['img003.safetensors']


def test_the_log_is_strict_json_even_for_a_nan_loss(tmp_path):
    from dvt_timm.training.trainer import _JsonLog

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')
    _JsonLog(tmp_path / 'log.jsonl', enabled=True)(event='val', step=4, val_loss=float('nan'))
    assert json.loads((tmp_path / 'log.jsonl').read_text(), parse_constant=refuse) == \
        {'event': 'val', 'step': 4, 'val_loss': None}


def test_files_that_can_never_fill_a_batch_are_reported(tmp_path, caplog):
    write_stage1(tmp_path / 'data', {(8, 8): 6, (6, 10): 2})
    with caplog.at_level('WARNING'):
        train(_config(tmp_path / 'data', tmp_path / 'run', steps=1, batch_size=4, val_frac=0))
    assert '2 training files are never used: their patch grids (6x10: 2) have fewer files than --batch-size 4' \
        in caplog.text


def test_amp_where_bf16_is_not_native_warns(tmp_path, caplog, monkeypatch):
    """bf16 autocast on a CPU without bf16 units is many times slower than fp32: --amp there says so."""
    write_stage1(tmp_path / 'data', {(8, 8): 4})
    for native in (True, False):
        monkeypatch.setattr(trainer, 'bf16_is_native', lambda device, native=native: native)
        caplog.clear()
        with caplog.at_level('WARNING'):
            train(_config(tmp_path / 'data', tmp_path / f'run_{native}', steps=1, batch_size=4, val_frac=0, amp=True))
        assert ('--amp on cpu, which has no native bf16' in caplog.text) is not native


# ---------------------------------------------------------------------------- training runs
def test_training_learns_the_pattern_and_writes_outputs(reference_run, stage1_dir):
    out = reference_run
    log = _log(out)
    assert log[0]['event'] == 'start' and log[0]['settings']['backbone'] == BACKBONE
    assert {s['file'] for s in log[0]['skipped']} >= {'junk.safetensors', 'vitb.safetensors'}
    losses = [r['loss'] for r in log if r['event'] == 'train']
    vals = [r['val_loss'] for r in log if r['event'] == 'val']
    assert [r['step'] for r in log if r['event'] == 'val'] == [4, 8, 12]
    assert all(r['samples_per_s'] > 0 for r in log if r['event'] == 'train')
    # Returning raw unchanged scores MSE(P) + (1 - cos); the denoiser must do far better on unseen files.
    scan = scan_stage1(stage1_dir, log=False)
    _, val_items = split_files(scan.items, RUN['val_frac'], RUN['seed'])
    pairs = [Stage1Dataset(val_items)[i] for i in range(len(val_items))]
    identity = sum(distance(r.reshape(1, -1, C), f.reshape(1, -1, C)).item()
                   for r, f, _ in pairs) / len(pairs)
    assert losses[-1] < 0.5 * losses[0]  # step 1 is the initial model's loss
    assert vals[-1] < 0.5 * identity, (vals, identity)
    # The run logs that baseline itself, and the model card shows it beside the denoiser's held-out loss.
    [baseline] = [r for r in log if r['event'] == 'baseline']
    assert baseline['identity_val_loss'] == pytest.approx(identity, rel=1e-5)
    assert f"| held-out loss of raw features as the prediction | {baseline['identity_val_loss']:.5f} |" in \
        (out / 'README.md').read_text()

    assert {'config.json', 'model.safetensors', 'README.md', 'checkpoint.pt', 'log.jsonl'} <= {p.name for p in out.iterdir()}
    config = json.loads((out / 'config.json').read_text())
    assert config['backbone'] == BACKBONE and config['grid_size'] == 37 and config['embed_dim'] == C
    assert 'input_size' not in config  # the files mix two input sizes
    state = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=True)
    assert state['step'] == 12 and state['scheduler']['last_epoch'] == 12
    assert {'model', 'optimizer', 'scheduler', 'rng'} <= set(state)
    weights = load_file(str(out / 'model.safetensors'))
    assert set(weights) == set(state['model'])
    assert all(torch.equal(weights[k], state['model'][k]) for k in weights)

    # Loads into DenoisedViT (random backbone: only the denoiser matters here) and scores as logged.
    model = DenoisedViT(BACKBONE, denoiser_checkpoint=out).eval()
    with torch.no_grad():
        d = [distance(model.denoiser(r.reshape(1, -1, C), r.shape[:2]), f.reshape(1, -1, C)).item()
             for r, f, _ in pairs]
    assert sum(d) / len(d) == pytest.approx(vals[-1], rel=1e-4)


def test_output_loads_with_from_pretrained(reference_run, vits_checkpoint):
    model = DenoisedViT.from_pretrained(str(reference_run), backbone_checkpoint=vits_checkpoint)
    weights = load_file(str(reference_run / 'model.safetensors'))
    assert model.backbone_name == BACKBONE
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in weights.items())
    with torch.no_grad():
        assert model.feature_map(torch.randn(1, 3, 112, 140)).shape == (1, C, 8, 10)


def test_fine_tuning_starts_from_the_initial_checkpoint(reference_run, stage1_dir, tmp_path):
    """--initial-checkpoint: a run starts from that denoiser, not from random weights; the card and --resume
    know which one; one for another backbone or shape is refused before anything is written."""
    out = tmp_path / 'ft'
    # A learning rate of 1e-12 leaves the weights where they started, so the result must be the reference's.
    train(_config(stage1_dir, out, steps=1, lr=1e-12, min_lr=0, initial_checkpoint=str(reference_run)))
    start, tuned = load_file(str(reference_run / 'model.safetensors')), load_file(str(out / 'model.safetensors'))
    assert all(torch.allclose(tuned[k], start[k], atol=1e-8) for k in start)
    first_loss = [r['loss'] for r in _log(out) if r['event'] == 'train'][0]
    assert first_loss < 0.5 * [r['loss'] for r in _log(reference_run) if r['event'] == 'train'][0]
    sha = 'sha256:' + hashlib.sha256((reference_run / 'model.safetensors').read_bytes()).hexdigest()
    assert f'| initial weights | {sha} |' in (out / 'README.md').read_text()
    # Resuming with other initial weights is another run.
    other = tmp_path / 'other'
    write_denoiser_checkpoint(other, {k: v + 1 for k, v in start.items()}, read_denoiser_checkpoint(reference_run)[1])
    with pytest.raises(ValueError, match='initial_checkpoint'):
        train(_config(stage1_dir, out, steps=1, lr=1e-12, min_lr=0, initial_checkpoint=str(other), resume=True))

    base = Denoiser(768, 37).state_dict()
    write_denoiser_checkpoint(tmp_path / 'vitb', base, DenoiserConfig('vit_base_patch14_dinov2.lvd142m', 768, 12, 37, 14))
    small = Denoiser(C, 16).state_dict()
    write_denoiser_checkpoint(tmp_path / 'grid16', small, DenoiserConfig('', C, 6, 16, 14))
    for init, message in (('vitb', r'denoiser for vit_base_patch14_dinov2\.lvd142m'), ('grid16', '16x16 position')):
        with pytest.raises(ValueError, match=message):
            train(_config(stage1_dir, tmp_path / f'run_{init}', initial_checkpoint=str(tmp_path / init)))
        assert not (tmp_path / f'run_{init}').exists()
    with pytest.raises(FileNotFoundError, match='no model.safetensors'):
        train(_config(stage1_dir, tmp_path / 'run_empty', initial_checkpoint=str(tmp_path)))


def test_average_denoisers_is_the_weighted_mean(tmp_path, vits_checkpoint, capsys):
    """`dvt-timm average-denoisers`: the weighted mean of denoisers of one backbone and shape, loadable like any
    of ours; the mean of the shipped denoiser with itself is that denoiser; mismatches are refused by name."""
    from dvt_timm.cli import main as cli_main
    shipped = REPO / 'weights' / 'dvt_vit_small_patch14_dinov2'
    _, config = read_denoiser_checkpoint(shipped)
    torch.manual_seed(0)
    other = {k: torch.randn_like(v) for k, v in load_file(str(shipped / 'model.safetensors')).items()}
    write_denoiser_checkpoint(tmp_path / 'other', other, config)
    assert cli_main(['average-denoisers', str(shipped), str(tmp_path / 'other'), '--weights', '0.25', '0.75',
                     '--out', str(tmp_path / 'mean')]) == 0
    start, mean = load_file(str(shipped / 'model.safetensors')), load_file(str(tmp_path / 'mean' / 'model.safetensors'))
    assert all(torch.allclose(mean[k], 0.25 * start[k] + 0.75 * other[k], atol=1e-6) for k in start)
    assert read_denoiser_checkpoint(tmp_path / 'mean')[1] == config
    sha = hashlib.sha256((shipped / 'model.safetensors').read_bytes()).hexdigest()
    assert f'| `{shipped}` | `{sha}` | 0.25 |' in (tmp_path / 'mean' / 'README.md').read_text()
    model = DenoisedViT.from_pretrained(str(tmp_path / 'mean'), backbone_checkpoint=vits_checkpoint)
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in mean.items())

    assert cli_main(['average-denoisers', str(shipped), str(shipped), '--out', str(tmp_path / 'self')]) == 0
    assert all(torch.equal(v, start[k]) for k, v in load_file(str(tmp_path / 'self' / 'model.safetensors')).items())

    write_denoiser_checkpoint(tmp_path / 'vitb', Denoiser(768, 37).state_dict(),
                              DenoiserConfig('vit_base_patch14_dinov2.lvd142m', 768, 12, 37, 14))
    write_denoiser_checkpoint(tmp_path / 'grid16', Denoiser(C, 16).state_dict(),
                              DenoiserConfig(config.backbone, C, 6, 16, 14, input_size=448))
    for args, message in (
            ([tmp_path / 'vitb'], 'vitb is a denoiser for vit_base_patch14_dinov2.lvd142m'),
            ([tmp_path / 'grid16'], 'grid16 has grid_size 16'),
            ([tmp_path / 'other', '--weights', '0.5', '0.6'], 'the weights must sum to 1, they sum to 1.1'),
            ([tmp_path / 'other', '--weights', '1'], '1 weights for 2 denoisers')):
        out = tmp_path / f'refused_{len(message)}'
        assert cli_main(['average-denoisers', str(shipped), *map(str, args), '--out', str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert cli_main(['average-denoisers', str(shipped), str(shipped), '--out', str(tmp_path / 'mean')]) == 1
    assert 'already holds a denoiser' in capsys.readouterr().err  # without --overwrite


def test_resume_after_kill_matches_uninterrupted_run(reference_run, stage1_dir, tmp_path):
    out = tmp_path / 'run'
    # A hard kill (SIGKILL) right after step 6: steps 5-6 are lost, the checkpoint of step 4 survives.
    cmd = [sys.executable, '-m', 'dvt_timm.training'] + _cli_args(stage1_dir, out, stop_after_steps=6)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == 4
    assert not (out / 'model.safetensors').exists()
    assert max(r['step'] for r in _log(out)) == 6

    # Without --resume the folder is refused; with different settings too.
    with pytest.raises(ValueError, match='--resume'):
        train(_config(stage1_dir, out))
    with pytest.raises(ValueError, match='lr: checkpoint 0.002, now 0.001'):
        train(_config(stage1_dir, out, resume=True, lr=1e-3))

    # Checkpoint cadence may change on resume; the log records this invocation's arguments, while
    # training_args.json keeps the first one's.
    summary = train(_config(stage1_dir, out, resume=True, ckpt_every=2))
    assert summary['steps'] == 12
    assert [(r['step'], r['args']['ckpt_every']) for r in _log(out) if r['event'] == 'resume'] == [(4, 2)]
    assert json.loads((out / 'training_args.json').read_text())['ckpt_every'] == 4
    ours, ref = load_file(str(out / 'model.safetensors')), load_file(str(reference_run / 'model.safetensors'))
    assert all(torch.equal(ours[k], ref[k]) for k in ref), 'resumed run differs from the uninterrupted one'
    a = torch.load(out / 'checkpoint.pt', weights_only=True)['optimizer']['state']
    b = torch.load(reference_run / 'checkpoint.pt', weights_only=True)['optimizer']['state']
    assert all(torch.equal(a[i]['exp_avg_sq'], b[i]['exp_avg_sq']) for i in b)
    # The log reads like one run: the lost steps were dropped and redone once.
    steps = [r['step'] for r in _log(out) if r['event'] == 'train']
    assert steps == list(range(1, 13))
    assert [r['val_loss'] for r in _log(out) if r['event'] == 'val'] == \
        [r['val_loss'] for r in _log(reference_run) if r['event'] == 'val']
    assert (out / 'README.md').read_text() == (reference_run / 'README.md').read_text()  # the baseline survives too
    assert (out / 'best' / 'README.md').read_text() == (reference_run / 'best' / 'README.md').read_text()
    best, ref_best = (load_file(str(o / 'best' / 'model.safetensors')) for o in (out, reference_run))
    assert all(torch.equal(best[k], ref_best[k]) for k in ref_best)

    # Resuming a finished run only rewrites the final files, to the same values.
    (out / 'model.safetensors').unlink()
    train(_config(stage1_dir, out, resume=True))
    assert all(torch.equal(load_file(str(out / 'model.safetensors'))[k], ref[k]) for k in ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_a_cuda_run_follows_the_cpu_run(reference_run, stage1_dir, tmp_path):
    out = tmp_path / 'run'
    summary = train(_config(stage1_dir, out, device='cuda', workers=1))  # pinned memory, a loading worker
    assert summary['steps'] == RUN['steps']
    # The same data, order and initialisation: held-out losses as on the CPU, up to float rounding.
    gpu, cpu = ([r['val_loss'] for r in _log(o) if r['event'] == 'val'] for o in (out, reference_run))
    assert gpu == pytest.approx(cpu, rel=1e-3), (gpu, cpu)
    weights = load_file(str(out / 'model.safetensors'))
    assert all(w.device.type == 'cpu' and torch.isfinite(w).all() for w in weights.values())


def _torchrun(args: list) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'dvt_timm.training'] + args
    return subprocess.run(cmd, env=_env(threads=1), capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_match_one_and_resume(reference_run, stage1_dir, tmp_path):
    out = tmp_path / 'ddp'
    proc = _torchrun(_cli_args(stage1_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _log(out)[0]['world_size'] == 2
    ours, ref = load_file(str(out / 'model.safetensors')), load_file(str(reference_run / 'model.safetensors'))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f'{k}: {m}')
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert len(state['rng']) == 2  # each rank's RNG, for its own resume
    ref_vals = [r['val_loss'] for r in _log(reference_run) if r['event'] == 'val']
    vals = [r['val_loss'] for r in _log(out) if r['event'] == 'val']
    assert vals == pytest.approx(ref_vals, rel=1e-4)

    # Both processes killed after step 6, then resumed: the same weights as the uninterrupted 2-process run.
    killed = tmp_path / 'ddp_killed'
    proc = _torchrun(_cli_args(stage1_dir, killed, stop_after_steps=6))
    assert proc.returncode != 0 and 'SIGKILL' in proc.stderr, proc.stderr[-3000:]
    assert torch.load(killed / 'checkpoint.pt', weights_only=True)['step'] == 4
    proc = _torchrun(_cli_args(stage1_dir, killed) + ['--resume'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_file(str(killed / 'model.safetensors'))
    assert all(torch.equal(resumed[k], ours[k]) for k in ours), 'resumed 2-process run differs'
