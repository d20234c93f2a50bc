"""Fused Triton kernels for `MultiHashGrid`: forward gather + bilinear blend, backward atomic scatter, and
the `HashTableAdam` step on its table.

One launch covers every field, sample and level: the grid is (cdiv(n_fields * N, BLOCK), n_levels),
each program handling BLOCK consecutive (field, sample) rows at one level. Keeping the level in
`program_id(1)`, as tiny-cuda-nn does, means the programs resident at any moment work on the same level
of neighbouring samples, so coarse levels stay in L2. Each thread owns one row: its corner indices and
weights are computed once, then the F features move as 16-byte vectors (chunks of 4 fp32), which keeps
the per-row index vectors and the [BLOCK, 4] feature tiles in the same register layout (no shared-memory
layout conversions; `tests/test_encoding.py` compiles them for sm_90 and checks the PTX for v4 loads and
v4 atomic adds (`atom`/`red.add.v4.f32`) and no barriers).
Index math is uint32 with wraparound, exactly like tcnn.

Import this module only where triton is installed (`encoding.has_triton()` guards it). For CPU testing
set ``TRITON_INTERPRET=1`` before triton is first imported and pass CPU tensors.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['hash_grid_triton', 'adam_step_touched_triton']


@triton.jit
def _level_corners(coords_ptr, table_ptr, scale_ptr, level, rows, mask):
    """Entry indices (within the level) and bilinear weights of the 4 corners for each row at `level`."""
    scale = tl.load(scale_ptr + level)
    stride = tl.load(table_ptr + level * 4 + 0).to(tl.uint32)  # resolution on dense levels, 0 on hashed
    size = tl.load(table_ptr + level * 4 + 1).to(tl.uint32)
    hashed = tl.load(table_ptr + level * 4 + 3)

    # One 8-byte (x, y) load per row.
    xy = tl.load(coords_ptr + rows[:, None] * 2 + tl.arange(0, 2)[None, :], mask=mask[:, None], other=0.0)
    x, y = tl.split(xy)
    # tcnn's pos_fract: pos = fmaf(scale, x, 0.5f); grid = (uint32_t)(int)floorf(pos); frac = pos - grid.
    px = tl.fma(x, scale, 0.5)
    py = tl.fma(y, scale, 0.5)
    fx = tl.floor(px)
    fy = tl.floor(py)
    tx = px - fx
    ty = py - fy
    gx0 = fx.to(tl.int32).to(tl.uint32)
    gy0 = fy.to(tl.int32).to(tl.uint32)
    gx1 = gx0 + 1
    gy1 = gy0 + 1

    if hashed != 0:
        # Coherent prime hash x*1 ^ y*2654435761 (uint32 wraparound). A hashed level's table is always
        # 2**log2_hashmap_size long, so the modulo is a mask.
        hmask = size - 1
        hy0 = gy0 * 2654435761
        hy1 = gy1 * 2654435761
        i00 = (gx0 ^ hy0) & hmask
        i10 = (gx1 ^ hy0) & hmask
        i01 = (gx0 ^ hy1) & hmask
        i11 = (gx1 ^ hy1) & hmask
    else:
        # Dense x + y*resolution; the modulo only bites at the x/y = 1 edge, where tcnn wraps around.
        dy0 = gy0 * stride
        dy1 = gy1 * stride
        i00 = (gx0 + dy0) % size
        i10 = (gx1 + dy0) % size
        i01 = (gx0 + dy1) % size
        i11 = (gx1 + dy1) % size

    ux = 1.0 - tx
    uy = 1.0 - ty
    return i00, i10, i01, i11, ux * uy, tx * uy, ux * ty, tx * ty


@triton.jit
def _hash_grid_fwd_kernel(
        coords_ptr, params_ptr, out_ptr, scale_ptr, table_ptr,
        n_rows, n_samples, field_numel,
        OUT_DIM: tl.constexpr, F: tl.constexpr, FV: tl.constexpr, BLOCK: tl.constexpr,
):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    mask2 = mask[:, None]

    i00, i10, i01, i11, w00, w10, w01, w11 = _level_corners(coords_ptr, table_ptr, scale_ptr, level, rows, mask)
    # Base pointer of each row's (field, level) table; int64 because n_fields * field_numel can pass 2**31.
    offset = tl.load(table_ptr + level * 4 + 2).to(tl.int32)
    field = rows // n_samples
    tab = params_ptr + field.to(tl.int64) * field_numel + offset * F

    out = out_ptr + rows.to(tl.int64) * OUT_DIM + level * F
    # Features in chunks of at most 4 (one 16-byte vector): a [BLOCK, 4] tile maps one row per thread,
    # the same as the per-row index vectors, so no shared-memory layout conversion is needed.
    for c in tl.static_range(F // FV):
        feat = c * FV + tl.arange(0, FV)
        v00 = tl.load(tab[:, None] + (i00.to(tl.int32) * F)[:, None] + feat[None, :], mask=mask2, other=0.0)
        v10 = tl.load(tab[:, None] + (i10.to(tl.int32) * F)[:, None] + feat[None, :], mask=mask2, other=0.0)
        v01 = tl.load(tab[:, None] + (i01.to(tl.int32) * F)[:, None] + feat[None, :], mask=mask2, other=0.0)
        v11 = tl.load(tab[:, None] + (i11.to(tl.int32) * F)[:, None] + feat[None, :], mask=mask2, other=0.0)
        acc = w00[:, None] * v00
        acc += w10[:, None] * v10
        acc += w01[:, None] * v01
        acc += w11[:, None] * v11
        tl.store(out[:, None] + feat[None, :], acc, mask=mask2)


@triton.jit
def _hash_grid_bwd_kernel(
        coords_ptr, grad_out_ptr, grad_params_ptr, scale_ptr, table_ptr,
        n_rows, n_samples, field_numel,
        OUT_DIM: tl.constexpr, F: tl.constexpr, FV: tl.constexpr, BLOCK: tl.constexpr,
):
    level = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    mask2 = mask[:, None]

    i00, i10, i01, i11, w00, w10, w01, w11 = _level_corners(coords_ptr, table_ptr, scale_ptr, level, rows, mask)
    offset = tl.load(table_ptr + level * 4 + 2).to(tl.int32)
    field = rows // n_samples
    tab = grad_params_ptr + field.to(tl.int64) * field_numel + offset * F

    gout = grad_out_ptr + rows.to(tl.int64) * OUT_DIM + level * F
    for c in tl.static_range(F // FV):
        feat = c * FV + tl.arange(0, FV)
        g = tl.load(gout[:, None] + feat[None, :], mask=mask2, other=0.0)
        tl.atomic_add(tab[:, None] + (i00.to(tl.int32) * F)[:, None] + feat[None, :], w00[:, None] * g,
                      mask=mask2, sem='relaxed')
        tl.atomic_add(tab[:, None] + (i10.to(tl.int32) * F)[:, None] + feat[None, :], w10[:, None] * g,
                      mask=mask2, sem='relaxed')
        tl.atomic_add(tab[:, None] + (i01.to(tl.int32) * F)[:, None] + feat[None, :], w01[:, None] * g,
                      mask=mask2, sem='relaxed')
        tl.atomic_add(tab[:, None] + (i11.to(tl.int32) * F)[:, None] + feat[None, :], w11[:, None] * g,
                      mask=mask2, sem='relaxed')


_BLOCK = 128  # rows per program: one (field, sample) row per thread at 4 warps
_NUM_WARPS = 4
# FMA contraction stays on, as in every Triton up to 3.9 and in tcnn's nvcc build: Triton 3.10 turns it off
# by default (3.9 warns), which would change the kernels' rounding and speed with whatever triton torch brings.
_FP_FUSION = True


def _constants(n_levels: int, n_feat: int) -> dict:
    """The kernels' compile-time arguments for a grid of `n_levels` levels of `n_feat` features."""
    return dict(OUT_DIM=n_levels * n_feat, F=n_feat, FV=min(n_feat, 4), BLOCK=_BLOCK)


def _launch(kernel, n_rows: int, n_levels: int, n_feat: int, device: torch.device, *args) -> None:
    grid = (triton.cdiv(n_rows, _BLOCK), n_levels)
    # Triton launches on the current CUDA device and its stream, not on the tensors' device: under torchrun
    # rank r's tensors live on cuda:r while the current device may still be cuda:0.
    with torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext():
        kernel[grid](*args, **_constants(n_levels, n_feat), num_warps=_NUM_WARPS, enable_fp_fusion=_FP_FUSION)


class _HashGridFunction(torch.autograd.Function):
    """Autograd wrapper: gradients flow to `params` only (coordinates are fixed inputs)."""

    @staticmethod
    def forward(ctx, params: Tensor, coords: Tensor, level_scale: Tensor, level_table: Tensor) -> Tensor:
        n_fields, n_samples, _ = coords.shape
        n_levels = level_scale.shape[0]
        n_feat = params.shape[-1]
        n_rows = n_fields * n_samples
        if n_rows >= 2 ** 30:  # the kernel addresses coordinate rows * 2 in int32
            raise ValueError(f'n_fields * N = {n_rows} must be < 2**30')
        coords = coords.to(torch.float32).contiguous()
        params = params.contiguous()
        out = torch.empty(n_fields, n_samples, n_levels * n_feat, device=coords.device, dtype=torch.float32)
        if n_rows:
            _launch(_hash_grid_fwd_kernel, n_rows, n_levels, n_feat, coords.device,
                    coords, params, out, level_scale, level_table, n_rows, n_samples, params.shape[1] * n_feat)
        ctx.save_for_backward(coords, level_scale, level_table)
        ctx.params_shape = params.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        coords, level_scale, level_table = ctx.saved_tensors
        grad_params = None
        if ctx.needs_input_grad[0]:
            n_fields, n_samples, _ = coords.shape
            n_levels = level_scale.shape[0]
            n_feat = ctx.params_shape[-1]
            n_rows = n_fields * n_samples
            grad_out = grad_out.to(torch.float32).contiguous()
            grad_params = torch.zeros(ctx.params_shape, device=grad_out.device, dtype=torch.float32)
            if n_rows:
                _launch(_hash_grid_bwd_kernel, n_rows, n_levels, n_feat, coords.device, coords, grad_out,
                        grad_params, level_scale, level_table, n_rows, n_samples, ctx.params_shape[1] * n_feat)
        return grad_params, None, None, None


def hash_grid_triton(params: Tensor, coords: Tensor, level_scale: Tensor, level_table: Tensor) -> Tensor:
    """Fused multi-field hash-grid encoding; same contract as `encoding.hash_grid_torch` (fp32 params)."""
    return _HashGridFunction.apply(params, coords, level_scale, level_table)


@triton.jit
def _adam_touched_kernel(
        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, steps_ptr, n,
        lr, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
        BLOCK: tl.constexpr,
):
    # A value whose gradient is exactly zero costs the load of that gradient and nothing else: the other
    # loads and the stores are masked off, as tiny-cuda-nn's adam_step returns early.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + offs, mask=offs < n, other=0.0)
    live = (offs < n) & (g != 0.0)
    p = tl.load(param_ptr + offs, mask=live, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=live, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0)
    t = tl.load(steps_ptr + offs, mask=live, other=0) + 1
    g += weight_decay * p
    m += (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    tf = t.to(tl.float32)
    bias1 = 1.0 - tl.exp2(tf * log2_beta1)
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(tf * log2_beta2))
    p -= (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(param_ptr + offs, p, mask=live)
    tl.store(exp_avg_ptr + offs, m, mask=live)
    tl.store(exp_avg_sq_ptr + offs, v, mask=live)
    tl.store(steps_ptr + offs, t, mask=live)


_ADAM_BLOCK = 1024  # 8 values per thread at 4 warps: two 16-byte vectors per tensor


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta**t = exp2(t * log2(beta)); 0**t = 0


def adam_step_touched_triton(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor,
                             lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Fused `table_adam.adam_step_touched` (contiguous fp32 tensors, int32 `steps`)."""
    n = param.numel()
    if not n:
        return
    with torch.cuda.device(param.device) if param.device.type == 'cuda' else contextlib.nullcontext():
        _adam_touched_kernel[(triton.cdiv(n, _ADAM_BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, steps, n, float(lr), float(beta1), float(beta2), _log2(beta1),
            _log2(beta2), float(eps), float(weight_decay), BLOCK=_ADAM_BLOCK, num_warps=_NUM_WARPS,
            enable_fp_fusion=_FP_FUSION)
