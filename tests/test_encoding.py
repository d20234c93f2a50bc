"""Hash-grid encoding (dvt_timm/fields/encoding.py): known answers, gradients, backend agreement.

The Triton kernels are checked on the CPU through Triton's interpreter, which must be enabled before
triton is first imported, so that check runs in a subprocess with TRITON_INTERPRET=1. On a CUDA machine
the compiled kernel (and tiny-cuda-nn, when it imports) are compared with the reference as well.
"""
import dataclasses
import inspect
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from conftest import require_triton
from dvt_timm.fields.encoding import (
    HashGridConfig, MultiHashGrid, grid_index, has_tcnn, has_triton, hash_grid_torch)
from dvt_timm.fields import PRESETS

REPO = Path(__file__).resolve().parents[1]
U32 = 2 ** 32
PRIME = 2654435761


# Two levels, F=2, a 16-entry table: level 0 is a dense 4x4 grid (scale 3), level 1 an 8x8 grid (scale 7)
# that does not fit and is hashed.
TINY = HashGridConfig(n_levels=2, n_features_per_level=2, log2_hashmap_size=4, base_resolution=4, finest_resolution=8)


def _f32(v: float) -> float:
    return struct.unpack('f', struct.pack('f', v))[0]


def _oracle_index(ix: int, iy: int, resolution: int, size: int) -> int:
    """tcnn's grid_index written out with Python integers (no int64 tricks)."""
    ix, iy = ix % U32, iy % U32
    if size < resolution * resolution:
        idx = ix ^ (iy * PRIME % U32)
    else:
        idx = (ix + iy * resolution) % U32
    return idx % size


def _oracle_encode(enc: MultiHashGrid, field: int, x: float, y: float) -> list:
    """Scalar, loop-by-loop tcnn HashGrid forward for one point (pure Python)."""
    table = enc.params[field].detach().double().tolist()
    out = []
    for lvl in enc.config.levels:
        px, py = _f32(x * lvl.scale + 0.5), _f32(y * lvl.scale + 0.5)
        gx, gy = math.floor(px), math.floor(py)
        tx, ty = px - gx, py - gy
        acc = [0.0] * enc.config.n_features_per_level
        for cx, cy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            w = (tx if cx else 1 - tx) * (ty if cy else 1 - ty)
            row = table[lvl.offset + _oracle_index(gx + cx, gy + cy, lvl.resolution, lvl.size)]
            acc = [a + w * v for a, v in zip(acc, row)]
        out += acc
    return out


def _fill_known(enc: MultiHashGrid) -> None:
    """Entry e of level l, feature f, field k holds 1000*l + 10*e + f + 0.5*k."""
    F = enc.config.n_features_per_level
    with torch.no_grad():
        for k in range(enc.n_fields):
            for l, lvl in enumerate(enc.config.levels):
                e = torch.arange(lvl.size, dtype=torch.float32)[:, None]
                enc.params[k, lvl.offset:lvl.offset + lvl.size] = 1000 * l + 10 * e + torch.arange(F) + 0.5 * k


def test_default_config_level_tables():
    cfg = HashGridConfig()
    assert cfg.per_level_scale == pytest.approx(64 ** (1 / 15), rel=1e-12)
    assert cfg.per_level_scale == pytest.approx(1.3195079, abs=1e-7)
    assert cfg.output_dim == 128
    levels = cfg.levels
    # scale_l = 16 * 2**(l * log2 1.3195) - 1 evaluated in fp32 as tcnn does: log2f(1.3195079565f) =
    # 0.40000004f, so levels 5, 10, 15 (exactly 63, 255, 1023 in real arithmetic) land just above the
    # integer, e.g. 15 * 0.40000004f = 6.0000005f, exp2f -> 64.000023f, *16 - 1 -> 1023.00037f, and
    # ceil() + 1 gives 65, 257, 1025 instead of 64, 256, 1024.
    assert levels[0].scale == 15.0
    assert levels[15].scale == 1023.0003662109375
    assert [lvl.resolution for lvl in levels] == [
        16, 22, 28, 37, 49, 65, 85, 112, 148, 195, 257, 338, 446, 589, 777, 1025]
    # res**2 rounded up to a multiple of 8, capped at 2**20: 22**2 = 484 -> 488, ..., 1025**2 -> 2**20.
    assert [lvl.size for lvl in levels] == [
        256, 488, 784, 1376, 2408, 4232, 7232, 12544, 21904, 38032, 66056, 114248, 198920, 346928, 603736,
        1048576]
    assert [lvl.offset for lvl in levels] == [
        0, 256, 744, 1528, 2904, 5312, 9544, 16776, 29320, 51224, 89256, 155312, 269560, 468480, 815408,
        1419144]
    # Only the finest level overflows the table (1025**2 = 1050625 > 2**20): it alone is hashed.
    assert [lvl.hashed for lvl in levels] == [False] * 15 + [True]
    assert cfg.n_params_per_field == 1419144 + 1048576
    enc = MultiHashGrid(cfg, n_fields=2)
    assert enc.params.shape == (2, 2467720, 8) and enc.params.dtype == torch.float32
    assert -1e-4 <= enc.params.min().item() < enc.params.max().item() <= 1e-4
    assert list(enc.state_dict()) == ['params']  # level tables are derived, not state


def test_tiny_config_tables():
    lv = TINY.levels
    assert TINY.per_level_scale == pytest.approx(2.0)
    assert [(l.scale, l.resolution, l.offset, l.size, l.hashed) for l in lv] == [
        (3.0, 4, 0, 16, False), (7.0, 8, 16, 16, True)]
    assert TINY.n_params_per_field == 32


def test_grid_index_dense_hash_and_wraparound():
    def gi(ix, iy, res, size):
        hashed = size < res * res
        return int(grid_index(torch.tensor(ix), torch.tensor(iy), torch.tensor(0 if hashed else res),
                              torch.tensor(size), torch.tensor(hashed)))
    assert gi(3, 5, 22, 488) == 3 + 5 * 22  # dense
    assert gi(16, 15, 16, 256) == 0  # dense wraparound at the x = 1 edge: 16 + 15 * 16 = 256 -> 0
    # hash: 5 * 2654435761 = 13272178805 = 387276917 (mod 2**32); ^ 3 = 387276918; mod 2**20 = 352374
    assert gi(3, 5, 1025, 2 ** 20) == 352374
    # uint32 wraparound of a negative vertex: 0xFFFFFFFF * P = 2**32 - P = 1640531535 (mod 2**32);
    # 0xFFFFFFFF ^ 1640531535 = 2654435760; mod 2**20 = 489904
    assert gi(-1, -1, 1025, 2 ** 20) == 489904
    # Large vertices against the Python-integer oracle (the int64 path must not overflow).
    g = torch.Generator().manual_seed(0)
    ix = torch.randint(0, U32, (500,), generator=g, dtype=torch.int64)
    iy = torch.randint(0, U32, (500,), generator=g, dtype=torch.int64)
    for res, size in ((1025, 2 ** 20), (777, 603736), (3000, 2 ** 13)):
        hashed = size < res * res
        got = grid_index(ix, iy, torch.tensor(0 if hashed else res), torch.tensor(size), torch.tensor(hashed))
        want = [_oracle_index(a, b, res, size) for a, b in zip(ix.tolist(), iy.tolist())]
        assert got.tolist() == want


def test_known_answer_dense_and_hashed_levels():
    enc = MultiHashGrid(TINY, n_fields=1, backend='torch')
    _fill_known(enc)
    coords = torch.tensor([[[0.25, 0.5], [0.0, 0.0], [1.0, 1.0]]])
    out = enc(coords)[0]
    # (0.25, 0.5). Level 0: pos = (1.25, 2.0) -> vertex (1, 2), frac (0.25, 0): entries 1+2*4 = 9 (w .75)
    # and 10 (w .25) -> 10 * 9.25 = 92.5. Level 1 (hashed): pos = (2.25, 4.0) -> vertex (2, 4);
    # 4 * P = 2027808452 (mod 2**32), ^2 -> ...454 % 16 = 6, ^3 -> ...455 % 16 = 7 -> 1000 + 10 * 6.25.
    assert out[0].tolist() == [92.5, 93.5, 1062.5, 1063.5]
    # (0, 0): pos 0.5 everywhere. Level 0: entries 0, 1, 4, 5 at w .25 -> 25. Level 1: 0^0 = 0, 1^0 = 1,
    # 0^P = 2654435761 % 16 = 1, 1^P % 16 = 0 -> entries 0, 1, 1, 0 -> 1005.
    assert out[1].tolist() == [25.0, 26.0, 1005.0, 1006.0]
    # (1, 1): pos 3.5 / 7.5. Level 0 wraps around like tcnn: (3,3)=15, (4,3)=16%16=0, (3,4)=19%16=3,
    # (4,4)=20%16=4 -> 55. Level 1: 7P, 8P end in hex 7, 8: 7^7=0, 8^7=15, 7^8=15, 8^8=0 -> 1075.
    assert out[2].tolist() == [55.0, 56.0, 1075.0, 1076.0]


def test_reference_matches_scalar_oracle():
    cfg = HashGridConfig(n_levels=5, n_features_per_level=4, log2_hashmap_size=10, base_resolution=5,
                         finest_resolution=90)
    assert any(l.hashed for l in cfg.levels) and not all(l.hashed for l in cfg.levels)
    enc = MultiHashGrid(cfg, n_fields=2, backend='torch')
    torch.manual_seed(0)
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    pts = torch.rand(2, 40, 2)
    pts[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    out = enc(pts)
    for k in range(2):
        want = torch.tensor([_oracle_encode(enc, k, x, y) for x, y in pts[k].tolist()], dtype=torch.float64)
        torch.testing.assert_close(out[k].double(), want, atol=1e-6, rtol=0)


def test_bilinear_reproduces_linear_function():
    # All-dense levels (scales 7, 15, 31); each table holds a_f * ix + b_f * iy + c_f of its vertex.
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=16, base_resolution=8,
                         finest_resolution=32)
    assert not any(l.hashed for l in cfg.levels)
    a, b, c = torch.tensor([0.5, -0.25]), torch.tensor([0.125, 1.0]), torch.tensor([1.0, -2.0])
    enc = MultiHashGrid(cfg, n_fields=1, backend='torch')
    with torch.no_grad():
        for lvl in cfg.levels:
            e = torch.arange(lvl.resolution ** 2)
            ix, iy = (e % lvl.resolution).float()[:, None], (e // lvl.resolution).float()[:, None]
            enc.params[0, lvl.offset:lvl.offset + e.numel()] = a * ix + b * iy + c
    # x, y <= 0.9 keeps the +1 corner inside the grid (no edge wraparound), 0 is the low edge.
    xy = torch.rand(1, 200, 2) * 0.9
    xy[0, :3] = torch.tensor([[0.0, 0.0], [0.0, 0.9], [0.9, 0.0]])
    out = enc(xy).view(200, 3, 2).double()
    for l, lvl in enumerate(cfg.levels):
        p = xy[0].double() * lvl.scale + 0.5  # continuous grid coordinate
        want = a.double() * p[:, :1] + b.double() * p[:, 1:] + c.double()
        torch.testing.assert_close(out[:, l], want, atol=2e-5, rtol=0)


def test_reference_gradcheck_float64():
    enc = MultiHashGrid(TINY, n_fields=2, backend='torch')
    params = torch.randn(enc.params.shape, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(2, 7, 2)
    coords[0, 0] = torch.tensor([1.0, 1.0])  # include the wraparound corners
    assert torch.autograd.gradcheck(
        lambda p: hash_grid_torch(p, coords, enc.level_scale, enc.level_table), (params,))


def test_param_gradient_is_weighted_scatter():
    # d out[l*F + f] / d params[entry, f] is the corner weight: check one point by hand (0.25, 0.5).
    enc = MultiHashGrid(TINY, n_fields=1, backend='torch')
    out = enc(torch.tensor([[[0.25, 0.5]]]))
    out[0, 0, 1].backward()  # level 0, feature 1
    grad = enc.params.grad[0]
    want = torch.zeros_like(grad)
    want[9, 1], want[10, 1] = 0.75, 0.25
    assert torch.equal(grad, want)


def test_fields_are_independent():
    cfg = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4,
                         finest_resolution=64)
    enc = MultiHashGrid(cfg, n_fields=3, backend='torch')
    coords = torch.rand(3, 50, 2)
    before = enc(coords).detach()
    with torch.no_grad():
        enc.params[1].uniform_(-5, 5)
    after = enc(coords)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.equal(before[1], after[1])
    after[0].sum().backward()
    assert enc.params.grad[0].abs().sum() > 0
    assert not enc.params.grad[1:].any()


def test_backend_selection():
    enc = MultiHashGrid(TINY, n_fields=1)
    assert enc.backend == 'auto' and enc.resolve_backend() == 'torch'
    with pytest.raises(ValueError, match='unknown backend'):
        enc.backend = 'cuda'
    with enc.with_backend('tcnn'):
        assert enc.backend == 'tcnn'
        with pytest.raises(RuntimeError, match='tcnn'):
            enc(torch.rand(1, 4, 2))  # CPU tensors (or no tinycudann)
    assert enc.backend == 'auto'
    with pytest.raises(ValueError, match='coords of shape'):
        enc(torch.rand(2, 4, 2))
    shared = torch.rand(4, 2)
    torch.testing.assert_close(enc(shared), enc(shared[None]))
    if has_triton() and os.environ.get('TRITON_INTERPRET', '0') in ('', '0'):
        enc.backend = 'triton'
        with pytest.raises(RuntimeError, match='CUDA'):
            enc(torch.rand(1, 4, 2))


def test_auto_backend_falls_back_when_the_kernel_cannot_run(monkeypatch, caplog):
    """Triton builds its launcher with a C compiler on first use; without one, 'auto' must not fail the run."""
    require_triton()
    from dvt_timm.fields import encoding, encoding_triton

    def no_compiler(*args):
        raise RuntimeError('Failed to find C compiler')
    monkeypatch.setattr(encoding_triton, 'hash_grid_triton', no_compiler)
    monkeypatch.setattr(encoding, '_TRITON_USABLE', {})
    with caplog.at_level('WARNING'):
        assert not MultiHashGrid(TINY, n_fields=1)._triton_runs_on(torch.device('cpu', 0))
    assert 'Failed to find C compiler' in caplog.text and 'PyTorch reference' in caplog.text


def test_tcnn_wrapper_plumbing(monkeypatch):
    """The tcnn path's batch padding, per-field parameter views and gradient routing, with a CPU stand-in
    for tinycudann's bindings (flat params in tcnn layout, batches in multiples of 128)."""
    cfg = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=3,
                         finest_resolution=20)
    enc = MultiHashGrid(cfg, n_fields=3, backend='torch')
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    n_entries = cfg.n_params_per_field * cfg.n_features_per_level
    seen = []

    class FakeModuleFunction:
        @staticmethod
        def apply(native, x, params, loss_scale):
            assert native == 'native' and loss_scale == 1.0
            assert x.shape == (256, 2) and x.is_contiguous() and params.shape == (n_entries,)
            seen.append(params.data_ptr())
            return hash_grid_torch(params.view(1, -1, cfg.n_features_per_level), x[None], enc.level_scale,
                                   enc.level_table)[0]

    fake_modules = types.ModuleType('tinycudann.modules')
    fake_modules._module_function = FakeModuleFunction
    fake_modules._C = types.SimpleNamespace(batch_size_granularity=lambda: 128)
    fake_pkg = types.ModuleType('tinycudann')
    fake_pkg.modules = fake_modules
    monkeypatch.setitem(sys.modules, 'tinycudann', fake_pkg)
    monkeypatch.setitem(sys.modules, 'tinycudann.modules', fake_modules)

    coords = torch.rand(3, 200, 2)
    grad_out = torch.randn(3, 200, cfg.output_dim)
    out = enc._tcnn_fields(coords, 'native', 1.0)
    (out * grad_out).sum().backward()
    got_grad, enc.params.grad = enc.params.grad, None
    # Each field's call saw that field's own slice of `params`, in order.
    assert seen == [enc.params[f].data_ptr() for f in range(3)]
    ref = enc(coords)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_grad, enc.params.grad, atol=1e-6, rtol=0)


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETER_CHECK = textwrap.dedent('''
    import json, torch
    from dvt_timm.fields.encoding import HashGridConfig, MultiHashGrid

    def compare(cfg, n_fields, n, scale, grad_scale):
        torch.manual_seed(0)
        enc = MultiHashGrid(cfg, n_fields=n_fields, backend='torch')
        with torch.no_grad():
            enc.params.uniform_(-scale, scale)
        coords = torch.rand(n_fields, n, 2)
        coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
        grad_out = (torch.rand(n_fields, n, cfg.output_dim) * 2 - 1) * grad_scale
        res = {}
        for name in ('torch', 'triton'):
            enc.params.grad = None
            enc.backend = name
            out = enc(coords)
            (out * grad_out).sum().backward()
            res[name] = (out.detach(), enc.params.grad.clone())
        # Field independence of the fused kernel: scribble on field 1, field 0 must not move.
        enc.backend = 'triton'
        with torch.no_grad():
            enc.params[1].uniform_(-5, 5)
        out2 = enc(coords).detach()
        return {
            'fwd': (res['torch'][0] - res['triton'][0]).abs().max().item(),
            'grad': (res['torch'][1] - res['triton'][1]).abs().max().item(),
            'out_scale': res['torch'][0].abs().max().item(),
            'grad_scale': res['torch'][1].abs().max().item(),
            'field0_changed': not torch.equal(out2[0], res['triton'][0][0]),
            'field1_changed': not torch.equal(out2[1], res['triton'][0][1]),
        }

    small = HashGridConfig(n_levels=4, n_features_per_level=4, log2_hashmap_size=8, base_resolution=4,
                           finest_resolution=64)
    f2 = HashGridConfig(n_levels=3, n_features_per_level=2, log2_hashmap_size=6, base_resolution=3,
                        finest_resolution=20)
    probe = MultiHashGrid(small, n_fields=2)._triton_runs_on(torch.device('cpu', 0))  # what 'auto' checks on a GPU
    print(json.dumps({'small': compare(small, 3, 333, 0.5, 1.0), 'f2': compare(f2, 2, 129, 0.5, 1.0),
                      'default': compare(HashGridConfig(), 2, 300, 0.05, 0.1), 'probe_ran': probe}))
''')


def test_triton_matches_reference_interpreter():
    require_triton()  # the kernels' only check on a CPU: Triton's interpreter
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', _INTERPRETER_CHECK], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res.pop('probe_ran') is True
    for name, r in res.items():
        # The interpreter's tl.fma rounds twice (unlike the GPU's fused fma), which moves pos by up to
        # one fp32 ulp (6e-5 at scale 1023) and a weight by as much; param and grad_out magnitudes are
        # chosen so that stays below 1e-5, while a wrong corner or weight would be off by ~out/grad_scale.
        assert r['out_scale'] > 0.01 and r['grad_scale'] > 0.1, (name, r)
        assert r['fwd'] < 1e-5, (name, r)
        assert r['grad'] < 1e-5, (name, r)
        assert not r['field0_changed'] and r['field1_changed'], (name, r)


def _compile_for_gpu(kernel, args: tuple, constants: dict, arch: int):
    """Compile `kernel` ahead of time for CUDA sm_`arch`, specialised as a launch with `args` would be.

    No GPU needed: Triton lowers to PTX and assembles it with its bundled ptxas. Like Triton's launcher,
    pointers (CUDA allocations are 256-byte aligned) and integers divisible by 16 get a divisibility hint,
    which is what lets the compiler use vector loads and atomics.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dvt_timm.fields.encoding_triton import _FP_FUSION, _NUM_WARPS

    if 'constexprs' not in inspect.signature(ASTSource).parameters:
        pytest.skip(f'triton {triton.__version__}: its private ASTSource takes constants=, not the constexprs= '
                    'this helper passes')

    signature, attrs = {}, {}
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = '*' + {torch.float32: 'fp32', torch.int64: 'i64', torch.int32: 'i32'}[value.dtype]
        else:
            signature[name] = 'fp32' if isinstance(value, float) else 'i32'
        if isinstance(value, torch.Tensor) or isinstance(value, int) and value % 16 == 0:
            attrs[(i,)] = [['tt.divisibility', 16]]
    signature.update({name: 'constexpr' for name in constants})
    src = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(src, target=GPUTarget('cuda', arch, 32),
                          options={'num_warps': _NUM_WARPS, 'enable_fp_fusion': _FP_FUSION})


@pytest.mark.parametrize('arch', [80, 90])
def test_triton_kernels_compile_for_cuda(arch):
    """The interpreter runs the kernels (and the table's Adam step) as Python, so only a real compile catches
    what fails on a GPU (types, layouts, atomics); this one runs without a GPU, for A100 (sm_80) and H100
    (sm_90)."""
    require_triton()
    import re
    from dvt_timm.fields import encoding_triton as et

    fast = PRESETS['fast'].hash
    configs = [PRESETS['paper'].hash] + [dataclasses.replace(fast, n_features_per_level=f) for f in (1, 2, 4, 8)]
    for cfg in configs:
        n_feat, n_fields, n_samples = cfg.n_features_per_level, 2, 2048
        enc = MultiHashGrid(cfg, n_fields=n_fields)
        coords = torch.rand(n_fields, n_samples, 2)
        out = torch.empty(n_fields, n_samples, cfg.output_dim)
        ints = (n_fields * n_samples, n_samples, enc.params.shape[1] * n_feat)  # as _HashGridFunction passes them
        constants = et._constants(cfg.n_levels, n_feat)
        fwd = _compile_for_gpu(et._hash_grid_fwd_kernel, (coords, enc.params.data, out, enc.level_scale,
                                                          enc.level_table, *ints), constants, arch)
        bwd = _compile_for_gpu(et._hash_grid_bwd_kernel, (coords, out, enc.params.data, enc.level_scale,
                                                          enc.level_table, *ints), constants, arch)
        assert fwd.asm['cubin'] and bwd.asm['cubin'], (arch, n_feat)
        if arch == 90 and n_feat == 8:  # the presets' grids (8 features per level) on an H100
            fwd_ptx, bwd_ptx = fwd.asm['ptx'], bwd.asm['ptx']
            # The design in encoding_triton's docstring: each thread moves its row's features as 16-byte
            # vectors, gathers and scatters alike, with no shared-memory round trips.
            assert re.search(r'ld\.global\S*\.v4\.b32', fwd_ptx), 'forward gathers are not 16-byte vector loads'
            # Triton 3.9 emits `red` (no return value) where 3.8 and older emit `atom`: both are v4 atomic adds.
            assert re.search(r'(atom|red)\.global\S*\.add\.v4\.f32', bwd_ptx), 'backward atomics are not v4'
            assert 'bar.sync' not in fwd_ptx and 'bar.sync' not in bwd_ptx, 'a layout conversion through shared memory'
    # HashTableAdam's step on the paper grid's table of 16 fields: the gradient, which it reads in full, moves
    # as 16-byte vectors; the rest is loaded and stored only where the gradient is non-zero.
    table = torch.zeros(16 * PRESETS['paper'].hash.n_params_per_field * 8)
    args = (table, table, table, table, table.int(), table.numel(), 0.01, 0.9, 0.99, -0.15, -0.0145, 1e-15, 1e-5)
    adam = _compile_for_gpu(et._adam_touched_kernel, args, dict(BLOCK=et._ADAM_BLOCK), arch)
    assert adam.asm['cubin'], arch
    if arch == 90:
        assert re.search(r'ld\.global\S*\.v4\.b32', adam.asm['ptx']), 'gradient loads are not 16-byte vectors'


def _compare_on_cuda(backend: str) -> None:
    cfg = HashGridConfig()
    torch.manual_seed(0)
    enc = MultiHashGrid(cfg, n_fields=3, backend='torch').cuda()
    with torch.no_grad():
        enc.params.uniform_(-1, 1)
    coords = torch.rand(3, 1000, 2, device='cuda')
    coords[0, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    grad_out = torch.randn(3, 1000, cfg.output_dim, device='cuda')
    res = {}
    for name in ('torch', backend):
        enc.params.grad = None
        enc.backend = name
        out = enc(coords)
        (out * grad_out).sum().backward()
        res[name] = (out.detach(), enc.params.grad.clone())
    # Per-level errors in the message: a mismatch confined to levels 5/10/15 (exactly integral scales)
    # would mean this device's exp2f rounds differently from the fp32 level tables (see encoding.py).
    fwd_err = (res[backend][0] - res['torch'][0]).abs().view(3, 1000, cfg.n_levels, -1).amax(dim=(0, 1, 3))
    grad_err = torch.stack([(res[backend][1] - res['torch'][1])[:, l.offset:l.offset + l.size].abs().max()
                            for l in cfg.levels])
    msg = f'per-level max |diff|: fwd {fwd_err.tolist()}, grad {grad_err.tolist()}'
    assert fwd_err.max() <= 1e-5, msg
    assert grad_err.max() <= 1e-4, msg


@pytest.mark.skipif(not (has_triton() and torch.cuda.is_available()), reason='needs triton and a CUDA GPU')
def test_triton_matches_reference_cuda():
    _compare_on_cuda('triton')


@pytest.mark.skipif(not has_tcnn(), reason='tinycudann is not importable (needs a CUDA GPU and a tcnn build)')
def test_tcnn_matches_reference():
    _compare_on_cuda('tcnn')
