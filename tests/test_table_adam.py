"""HashTableAdam (dvt_timm/fields/table_adam.py): Adam that skips the hash-table values a step did not touch.

The Triton step runs on the CPU through Triton's interpreter, in a subprocess (TRITON_INTERPRET must be set
before triton is first imported); tests/test_encoding.py compiles it for sm_80 / sm_90.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import require_triton
from dvt_timm.fields import PRESETS
from dvt_timm.fields.decomposition import ImageFields, field_optimizers
from dvt_timm.fields.table_adam import HashTableAdam

REPO = Path(__file__).resolve().parents[1]
HP = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-15, weight_decay=1e-5)  # stage 1's settings


def test_every_value_with_a_gradient_is_stepped_as_torch_adam_steps_it():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(2, 64, 8))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt, ref_opt = HashTableAdam([ours], **HP), torch.optim.Adam([ref], **HP)
    for _ in range(40):
        grad = torch.randn_like(ours)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[ours]['exp_avg_sq'], ref_opt.state[ref]['exp_avg_sq'])


def test_values_without_a_gradient_are_left_alone_and_keep_their_own_step_count():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1, 6, 4))
    opt = HashTableAdam([p], **HP)
    touched = torch.zeros(1, 6, 4, dtype=torch.int32)
    for step in range(10):
        before = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items()}
        grad = torch.randn_like(p)
        grad[0, step % 3] = 0  # entry 0, 1 or 2 untouched this step
        grad[0, 3, 1] = 0  # one value of an entry that is touched
        if step < 5:
            grad[0, 4] = 0  # entry 4 touched from step 5 on only
        grad[0, 5] = 0  # entry 5 never
        p.grad = grad
        opt.step()
        live = grad != 0
        touched += live.to(torch.int32)
        assert torch.equal(p.detach()[~live], before[~live])
        assert (p.detach()[live] != before[live]).all()
        for key, value in state.items():  # moments and step counts of untouched values: bit for bit
            assert torch.equal(opt.state[p][key][~live], value[~live]), key
    assert torch.equal(opt.state[p]['steps'], touched)
    assert touched[0, 4].tolist() == [5] * 4 and touched[0, 5].tolist() == [0] * 4
    # A value's first step is bias-corrected by its own count: |m / sqrt(v)| = 1, so it moves by lr
    # (up to the weight decay term), whenever that first step comes.
    opt2 = HashTableAdam([p], **HP)
    for step in range(3):
        p.grad = torch.zeros_like(p)
        p.grad[0, 0, 0] = 1.0 if step == 2 else 0.0
        p.grad[0, 1, 0] = -2.0
        before = p.detach().clone()
        opt2.step()
        if step == 0:
            assert (before - p.detach())[0, 1, 0].item() == pytest.approx(-HP['lr'], rel=1e-3)
    assert (before - p.detach())[0, 0, 0].item() == pytest.approx(HP['lr'], rel=1e-3)


def test_hash_table_adam_refuses_what_it_cannot_step():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match='fp32'):
        HashTableAdam([p], lr=0.01).step()
    with pytest.raises(ValueError, match='lr'):
        HashTableAdam([p], lr=0)


@pytest.mark.parametrize('sparse', [True, False])
def test_stage1_optimizes_every_field_parameter_once(sparse):
    """`sparse_table_adam` gives the hash table HashTableAdam and the rest torch's Adam; off, torch's Adam
    steps everything (the authors' code). Either way each parameter has one optimizer, with the settings'
    hyper-parameters."""
    settings = PRESETS['fast'].with_overrides(sparse_table_adam=sparse)
    fields = ImageFields([1, 2], embed_dim=16, grid=4, hash_config=settings.hash)
    opts = field_optimizers(fields, settings)
    owner = {id(p): type(o) for o in opts for group in o.param_groups for p in group['params']}
    assert sorted(owner) == sorted(id(p) for p in fields.parameters())
    assert sum(len(group['params']) for o in opts for group in o.param_groups) == len(owner)
    assert owner[id(fields.encoding.params)] is (HashTableAdam if sparse else torch.optim.Adam)
    assert {owner[id(fields.artifact)]} == {torch.optim.Adam}
    for o in opts:
        group = o.param_groups[0]
        assert (group['lr'], group['betas'], group['eps'], group['weight_decay']) == (
            settings.lr, settings.betas, settings.eps, settings.weight_decay)


_INTERPRETER_CHECK = textwrap.dedent('''
    import json, torch
    from dvt_timm.fields.table_adam import adam_step_touched
    from dvt_timm.fields.encoding_triton import adam_step_touched_triton

    torch.manual_seed(0)
    start = torch.randn(3, 333, 8)
    runs = [[start.clone(), torch.zeros_like(start), torch.zeros_like(start),
             torch.zeros_like(start, dtype=torch.int32)] for _ in range(2)]
    for step in range(25):
        grad = torch.randn_like(start) * (torch.rand(3, 333, 1) < 0.3)
        grad[0, 0, 3] = 0
        for fn, state in zip((adam_step_touched, adam_step_touched_triton), runs):
            fn(*state[:1], grad, *state[1:], 0.01, 0.9, 0.99, 1e-15, 1e-5)
    (p, m, v, s), (tp, tm, tv, ts) = runs
    print(json.dumps({'param': (p - tp).abs().max().item(), 'exp_avg': (m - tm).abs().max().item(),
                      'exp_avg_sq': (v - tv).abs().max().item(), 'steps_equal': torch.equal(s, ts),
                      'moved': (p != start).float().mean().item(), 'max_steps': int(s.max())}))
''')


def test_triton_step_matches_the_reference_interpreter():
    require_triton()
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', _INTERPRETER_CHECK], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res['steps_equal'] and 0.5 < res['moved'] < 1 and res['max_steps'] > 10, res
    # exp2 vs exp in the bias corrections, m + w (g - m) vs lerp: last-bit differences (values are O(1)).
    assert res['param'] < 1e-6 and res['exp_avg'] < 1e-6 and res['exp_avg_sq'] < 1e-6, res


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_step_matches_the_reference():
    require_triton()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 5000, 8))
    q = torch.nn.Parameter(p.detach().cuda())
    opt, cuda_opt = HashTableAdam([p], **HP), HashTableAdam([q], **HP)
    for _ in range(20):
        grad = torch.randn_like(p) * (torch.rand(4, 5000, 1) < 0.1)
        p.grad, q.grad = grad, grad.cuda()
        opt.step()
        cuda_opt.step()
    # The compiled kernel's approximate sqrt / exp2 / division: a few ulp of |p| (up to ~4.5 here).
    torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(cuda_opt.state[q]['steps'].cpu(), opt.state[p]['steps'])


def test_cuda_step_falls_back_to_the_reference_where_triton_cannot_build(monkeypatch, caplog):
    """Where Triton cannot build the fused step (no C compiler for its launcher), HashTableAdam warns once
    and steps with the PyTorch reference; a failure after it once ran is raised, not hidden."""
    from dvt_timm.fields import encoding_triton, table_adam
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError('Failed to find C compiler')
    monkeypatch.setattr(table_adam, 'has_triton', lambda: True)
    monkeypatch.setattr(encoding_triton, 'adam_step_touched_triton', broken)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 7)
    monkeypatch.setattr(table_adam, '_TRITON_STEP_USABLE', {})
    param, state = torch.zeros(8), [torch.zeros(8), torch.zeros(8), torch.zeros(8, dtype=torch.int32)]
    args = (torch.ones(8), *state, 0.01, 0.9, 0.99, 1e-15, 0.0)
    with caplog.at_level('WARNING'):
        assert HashTableAdam._triton_step(param, *args) is False
        assert HashTableAdam._triton_step(param, *args) is False
    assert len(calls) == 1 and 'C compiler' in caplog.text and 'cuda:7' in caplog.text
    table_adam._TRITON_STEP_USABLE[7] = True
    with pytest.raises(RuntimeError, match='C compiler'):
        HashTableAdam._triton_step(param, *args)
