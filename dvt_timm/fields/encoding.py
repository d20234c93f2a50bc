"""Multi-resolution hash-grid encoding (InstantNGP) for many 2-D neural fields at once.

Stage 1 of DVT fits one small neural field per image. `MultiHashGrid` holds `n_fields` independent
parameter tables and encodes all of them in one call, with three interchangeable backends:

* ``'torch'``  -- vectorised PyTorch reference (any device, any float dtype, autograd for free);
* ``'triton'`` -- fused Triton kernels, one launch for all fields/samples/levels (see `encoding_triton`);
* ``'tcnn'``   -- tiny-cuda-nn's `GridEncoding` (optional; one native call per field).

All three follow tiny-cuda-nn's ``HashGrid`` with linear interpolation to the bit: level scales are
computed in fp32 exactly as tcnn does (this matters: with the default config the fp32 rounding turns
levels 5, 10 and 15 into resolutions 65, 257 and 1025 rather than 64, 256 and 1024, and makes level 15
hashed), positions are ``fma(x, scale, 0.5)``, corner indices use tcnn's dense/coherent-prime-hash rule
with uint32 wraparound, and the parameter layout is tcnn's (``offset * F + index * F + feature``).
"""
import contextlib
import functools
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    'HashGridConfig', 'GridLevel', 'MultiHashGrid', 'grid_index', 'hash_grid_torch',
    'has_triton', 'has_tcnn', 'check_backend', 'BACKENDS',
]

BACKENDS = ('torch', 'triton', 'tcnn')

_logger = logging.getLogger(__name__)
_TRITON_USABLE: Dict[int, bool] = {}  # CUDA device index -> our kernel ran there (see `_triton_runs_on`)

_U32 = 0xFFFFFFFF
_HASH_PRIME_Y = 2654435761  # tcnn's coherent prime hash factors are (1, 2654435761, ...)


def _f32(value: float) -> float:
    """Round a Python float to the nearest fp32 value (tcnn computes level scales in fp32)."""
    return struct.unpack('f', struct.pack('f', value))[0]


class GridLevel(NamedTuple):
    """One level of the grid: fp32 `scale`, vertex `resolution`, table `offset`/`size` (entries), `hashed`."""
    scale: float
    resolution: int
    offset: int
    size: int
    hashed: bool


@dataclass(frozen=True)
class HashGridConfig:
    """Hash-grid hyper-parameters (tiny-cuda-nn ``HashGrid`` with linear interpolation, 2-D input)."""
    n_levels: int = 16
    n_features_per_level: int = 8
    log2_hashmap_size: int = 20
    base_resolution: int = 16
    finest_resolution: int = 1024

    def __post_init__(self) -> None:
        if self.n_levels < 1:
            raise ValueError(f'n_levels must be >= 1, got {self.n_levels}')
        # tcnn instantiates 1, 2, 4, 8 features per level; Triton needs a power of two for the vector dim.
        if self.n_features_per_level not in (1, 2, 4, 8):
            raise ValueError(f'n_features_per_level must be 1, 2, 4 or 8, got {self.n_features_per_level}')
        if not 1 <= self.log2_hashmap_size <= 28:
            raise ValueError(f'log2_hashmap_size must be in [1, 28], got {self.log2_hashmap_size}')
        if self.base_resolution < 1 or self.finest_resolution < self.base_resolution:
            raise ValueError(
                f'need 1 <= base_resolution <= finest_resolution, got {self.base_resolution}, {self.finest_resolution}')
        # Kernels index a field's table with int32 (entry * F + feature) and dense strides with uint32.
        if self.n_params_per_field * self.n_features_per_level >= 2 ** 31:
            raise ValueError('hash grid too large: n_params_per_field * n_features_per_level must be < 2**31')
        if any(lvl.resolution > 0xFFFF for lvl in self.levels):
            raise ValueError('grid resolution above 65535 is not supported')

    @property
    def per_level_scale(self) -> float:
        """Growth factor between levels: exp(ln(finest / base) / (n_levels - 1))."""
        if self.n_levels == 1:
            return 1.0
        return math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.n_levels - 1))

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features_per_level

    @property
    def levels(self) -> Tuple[GridLevel, ...]:
        """Per-level tables, computed like tcnn's `GridEncodingTemplated` constructor and `grid_scale`.

        tcnn holds `per_level_scale` as fp32 and evaluates
        ``exp2f(level * log2f(per_level_scale)) * base_resolution - 1.0f`` in fp32; every step is
        reproduced here with an fp32 rounding (double results of +, *, log2, exp2 rounded once), because
        the ceil() that gives the resolution is sensitive to the last bit when the exact scale is integral.
        """
        log2_scale = _f32(math.log2(_f32(self.per_level_scale)))
        cap = 1 << self.log2_hashmap_size
        out, offset = [], 0
        for level in range(self.n_levels):
            scale = _f32(_f32(_f32(2.0 ** _f32(level * log2_scale)) * self.base_resolution) - 1.0)
            resolution = math.ceil(scale) + 1
            dense = resolution ** 2
            size = min(-(-dense // 8) * 8, cap)  # next multiple of 8 (alignment), capped by the hash table
            # A level is hashed only when capped, so a hashed table is 2**log2_hashmap_size long (the
            # Triton kernel relies on this to reduce the hash with a mask).
            out.append(GridLevel(scale, resolution, offset, size, size < dense))
            offset += size
        return tuple(out)

    @property
    def n_params_per_field(self) -> int:
        """Table entries per field (each holds `n_features_per_level` values)."""
        last = self.levels[-1]
        return last.offset + last.size

    def tcnn_config(self) -> dict:
        """The equivalent tiny-cuda-nn encoding config."""
        return {
            'otype': 'HashGrid',
            'n_levels': self.n_levels,
            'n_features_per_level': self.n_features_per_level,
            'log2_hashmap_size': self.log2_hashmap_size,
            'base_resolution': self.base_resolution,
            'per_level_scale': self.per_level_scale,
            'interpolation': 'Linear',
        }


def _mul_u32(a: Tensor, b: int) -> Tensor:
    """(a * b) mod 2**32 for int64 `a` in [0, 2**32) and a constant `b` < 2**32, without int64 overflow."""
    lo = a * (b & 0xFFFF)
    hi = ((a * (b >> 16)) & 0xFFFF) << 16  # only the low 16 bits of the high partial product survive mod 2**32
    return (lo + hi) & _U32


def grid_index(ix: Tensor, iy: Tensor, stride: Tensor, size: Tensor, hashed: Tensor) -> Tensor:
    """tcnn's `grid_index` for 2-D: table entry of integer vertex (ix, iy), uint32 semantics on int64 tensors.

    Dense levels use ``ix + iy * resolution`` (`stride`), hashed levels the coherent prime hash
    ``ix ^ (iy * 2654435761)``; either is taken modulo the level `size`. Inputs broadcast; negative
    vertices are reinterpreted as uint32, as tcnn's ``(uint32_t)(int)floorf(pos)`` does.
    """
    ix = ix & _U32
    iy = iy & _U32
    # stride is 0 on hashed levels, so the (discarded) dense value cannot overflow int64 there.
    dense = (ix + iy * stride) & _U32
    hashed_idx = ix ^ _mul_u32(iy, _HASH_PRIME_Y)
    return torch.where(hashed, hashed_idx, dense) % size


def hash_grid_torch(params: Tensor, coords: Tensor, level_scale: Tensor, level_table: Tensor) -> Tensor:
    """Reference multi-field hash-grid encoding in plain PyTorch.

    Args:
        params: (n_fields, n_params_per_field, F) tables, any float dtype (fp64 works for gradcheck).
        coords: (n_fields, N, 2) positions, nominally in [0, 1].
        level_scale: (L,) fp32 per-level scales.
        level_table: (L, 4) int64 rows of (dense stride or 0 when hashed, size, offset, hashed).

    Returns:
        (n_fields, N, L * F) encoding, level-major, in `params.dtype`.
    """
    n_fields, n_samples, _ = coords.shape
    n_params, n_feat = params.shape[1:]
    n_levels = level_scale.shape[0]
    stride, size, offset, hashed = level_table.unbind(-1)
    hashed = hashed.bool()

    # pos = fmaf(x, scale, 0.5f): the fp32 product is exact in fp64, so one fp64 add + one rounding to
    # fp32 reproduces the fused multiply-add (up to a vanishingly rare double-rounding tie).
    x = coords.to(torch.float64).unsqueeze(-2)  # (n, N, 1, 2)
    pos = (x * level_scale.to(torch.float64)[:, None] + 0.5).to(torch.float32)  # (n, N, L, 2)
    pos_grid = pos.floor()
    frac = pos - pos_grid  # exact in fp32
    grid = pos_grid.to(torch.int64)
    gx, gy = grid.unbind(-1)
    fx, fy = frac.unbind(-1)

    # All four corners at once, in tcnn's order (bit 0 of the corner id is +1 in x, bit 1 is +1 in y):
    # one gather means one dense gradient buffer in backward, not one per corner. x terms are laid out
    # (..., 1, 2) and y terms (..., 2, 1), so grid_index's per-axis work (masks, y * stride, y * prime)
    # runs on half-size tensors and only the final combine broadcasts to the (..., 2, 2) corners.
    step = torch.arange(2, device=coords.device)
    ix = (gx.unsqueeze(-1) + step).unsqueeze(-2)  # (n, N, L, 1, 2)
    iy = (gy.unsqueeze(-1) + step).unsqueeze(-1)  # (n, N, L, 2, 1)
    idx = grid_index(ix, iy, stride.view(-1, 1, 1), size.view(-1, 1, 1), hashed.view(-1, 1, 1))
    idx = idx.reshape(n_fields, n_samples, n_levels, 4)
    weight_x = torch.stack((1 - fx, fx), -1).unsqueeze(-2)
    weight_y = torch.stack((1 - fy, fy), -1).unsqueeze(-1)
    weight = (weight_x * weight_y).reshape(n_fields, n_samples, n_levels, 4)  # fp32 products, like tcnn

    # Row of each (field, level) table in the flattened (n_fields * n_params, F) view.
    base = (torch.arange(n_fields, device=coords.device) * n_params).view(n_fields, 1, 1, 1) + offset[:, None]
    flat = params.reshape(n_fields * n_params, n_feat)
    vals = flat.index_select(0, (base + idx).reshape(-1)).view(n_fields, n_samples, n_levels, 4, n_feat)
    # Outside autocast, which would make it bf16: the other backends blend in fp32.
    with torch.autocast(coords.device.type, enabled=False):
        if vals.is_cuda:  # elementwise, so that TF32 matmuls (set for the fields' MLPs) never round it
            out = (weight.to(params.dtype).unsqueeze(-1) * vals).sum(-2)
        else:  # (1 x 4) @ (4 x F) per (field, sample, level): no (..., 4, F) weighted temporary, ~3x faster
            out = torch.matmul(weight.to(params.dtype).unsqueeze(-2), vals)
    return out.reshape(n_fields, n_samples, n_levels * n_feat)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when our Triton kernels import (triton installed)."""
    try:
        from . import encoding_triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def has_tcnn() -> bool:
    """True when tinycudann imports (it raises EnvironmentError, not ImportError, without a CUDA GPU)."""
    try:
        import tinycudann  # noqa: F401
        from tinycudann.modules import _module_function  # noqa: F401
    except Exception:
        return False
    return True


def _triton_interpret() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def check_backend(name: str, device: torch.device) -> None:
    """Raise, naming what is missing, when backend `name` cannot run on `device` ('auto' and 'torch' always can),
    so that a run can fail before its first minutes of feature extraction rather than after them."""
    if name not in ('auto', 'torch', 'triton', 'tcnn'):
        raise ValueError(f"unknown backend {name!r}; use 'auto', 'torch', 'triton' or 'tcnn'")
    if name == 'triton':
        if not has_triton():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type != 'cuda' and not _triton_interpret():
            raise RuntimeError(
                "backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 set before triton is imported)")
    elif name == 'tcnn':
        if not has_tcnn():
            raise RuntimeError("backend 'tcnn' requested but tinycudann is not importable (needs a CUDA build)")
        if device.type != 'cuda':
            raise RuntimeError("backend 'tcnn' needs a CUDA device")


class MultiHashGrid(nn.Module):
    """`n_fields` independent 2-D hash-grid encodings evaluated in one call.

    `params` has shape (n_fields, n_params_per_field, n_features_per_level); field f's slice, flattened,
    is exactly tiny-cuda-nn's parameter vector for the same config. `backend` may be changed on a live
    module (same parameters), e.g. ``enc.backend = 'torch'`` or ``with enc.with_backend('torch'): ...``.
    """

    def __init__(self, config: HashGridConfig, n_fields: int = 1, backend: str = 'auto') -> None:
        super().__init__()
        if n_fields < 1:
            raise ValueError(f'n_fields must be >= 1, got {n_fields}')
        self.config = config
        self.n_fields = n_fields
        self.backend = backend
        levels = config.levels
        self.params = nn.Parameter(
            torch.empty(n_fields, config.n_params_per_field, config.n_features_per_level, dtype=torch.float32))
        # Small per-level tables as buffers so `.to(device)` carries them and no call rebuilds them.
        self.register_buffer(
            'level_scale', torch.tensor([lvl.scale for lvl in levels], dtype=torch.float32), persistent=False)
        self.register_buffer('level_table', torch.tensor(
            [[0 if lvl.hashed else lvl.resolution, lvl.size, lvl.offset, int(lvl.hashed)] for lvl in levels],
            dtype=torch.int64), persistent=False)
        self._tcnn_native = {}  # CUDA index -> (native tcnn module, loss scale); not part of the state dict
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # tcnn's initialisation: U(-1e-4, 1e-4).
        nn.init.uniform_(self.params, -1e-4, 1e-4)

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    @property
    def backend(self) -> str:
        """Requested backend: 'auto', 'torch', 'triton' or 'tcnn' ('auto' is resolved per call)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS + ('auto',):
            raise ValueError(f'unknown backend {name!r}; expected one of {BACKENDS + ("auto",)}')
        self._backend = name

    @contextlib.contextmanager
    def with_backend(self, name: str) -> Iterator['MultiHashGrid']:
        """Temporarily switch backend (same parameters): ``with enc.with_backend('torch'): ref = enc(x)``."""
        previous = self.backend
        self.backend = name
        try:
            yield self
        finally:
            self.backend = previous

    def resolve_backend(self, device: Optional[torch.device] = None) -> str:
        """The concrete backend a call on `device` (default: the parameters' device) would use."""
        device = torch.device(device) if device is not None else self.params.device
        if self._backend != 'auto':
            return self._backend
        if device.type == 'cuda':
            if has_triton() and self._triton_runs_on(device):
                return 'triton'
            if has_tcnn():
                return 'tcnn'
        return 'torch'

    def _triton_runs_on(self, device: torch.device) -> bool:
        """Whether our kernel compiles and runs on this GPU: Triton builds its launcher with the system's C
        compiler on first use, which slim containers lack. Checked once per device with a one-sample call;
        on failure 'auto' falls back, with a warning, instead of failing the run."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _TRITON_USABLE:
            try:
                from .encoding_triton import hash_grid_triton
                coords = torch.zeros(1, 1, 2, device=device)
                hash_grid_triton(self.params[:1].detach().float(), coords, self.level_scale, self.level_table)
                _TRITON_USABLE[index] = True
            except Exception as e:  # any failure to build or launch: the reference still works
                _logger.warning('Triton hash-grid kernel unusable on cuda:%d (%s: %s); using %s',
                                index, type(e).__name__, e, 'tcnn' if has_tcnn() else 'the PyTorch reference')
                _TRITON_USABLE[index] = False
        return _TRITON_USABLE[index]

    def forward(self, coords: Tensor) -> Tensor:
        """Encode (n_fields, N, 2) coordinates in [0, 1] (or (N, 2), shared by all fields) to (n_fields, N, L*F)."""
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(self.n_fields, -1, -1)
        if coords.dim() != 3 or coords.shape[0] != self.n_fields or coords.shape[-1] != 2:
            raise ValueError(f'expected coords of shape ({self.n_fields}, N, 2), got {tuple(coords.shape)}')
        if coords.device != self.params.device:
            raise ValueError(f'coords on {coords.device} but params on {self.params.device}')
        backend = self.resolve_backend(coords.device)
        if backend == 'torch':
            return hash_grid_torch(self.params, coords, self.level_scale, self.level_table)
        if backend == 'triton':
            return self._forward_triton(coords)
        return self._forward_tcnn(coords)

    def _forward_triton(self, coords: Tensor) -> Tensor:
        check_backend('triton', coords.device)
        if self.params.dtype != torch.float32:
            raise RuntimeError(f"backend 'triton' supports fp32 params only, got {self.params.dtype}")
        from .encoding_triton import hash_grid_triton
        return hash_grid_triton(self.params, coords, self.level_scale, self.level_table)

    def _native_tcnn(self, device: torch.device):
        """One native tcnn encoding per device, shared by all fields: the torch bindings take the
        parameter pointer on every call, so no per-field tcnn module (or its 2.5M-entry copy) is needed."""
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._tcnn_native:
            import tinycudann as tcnn
            with torch.cuda.device(key):
                enc = tcnn.Encoding(2, self.config.tcnn_config(), dtype=torch.float32)
            expected = self.config.n_params_per_field * self.config.n_features_per_level
            if enc.native_tcnn_module.n_params() != expected:
                raise RuntimeError(
                    f'tcnn HashGrid has {enc.native_tcnn_module.n_params()} params, we expect {expected}: '
                    'the level tables disagree with this tinycudann build')
            # Keep the native module only; the Python wrapper's own initial params are dropped.
            self._tcnn_native[key] = (enc.native_tcnn_module, enc.loss_scale)
        return self._tcnn_native[key]

    def _forward_tcnn(self, coords: Tensor) -> Tensor:
        check_backend('tcnn', coords.device)
        if self.params.dtype != torch.float32:
            raise RuntimeError(f"backend 'tcnn' supports fp32 params only, got {self.params.dtype}")
        native, loss_scale = self._native_tcnn(coords.device)
        return self._tcnn_fields(coords, native, loss_scale)

    def _tcnn_fields(self, coords: Tensor, native, loss_scale: float) -> Tensor:
        """Run the native tcnn encoding once per field, each on its own slice of `params`."""
        # Private but long-stable entry point of the torch bindings: (native module, input, params, loss scale).
        from tinycudann.modules import _C, _module_function
        granularity = int(_C.batch_size_granularity())  # tcnn only takes batches in multiples of this
        n_samples = coords.shape[1]
        padded = -(-n_samples // granularity) * granularity
        x = coords.to(torch.float32)
        if padded != n_samples:
            x = nn.functional.pad(x, (0, 0, 0, padded - n_samples))
        outs = []
        for f in range(self.n_fields):
            # params[f] is contiguous and, flattened, exactly tcnn's layout; grads flow back to the view.
            y = _module_function.apply(native, x[f].contiguous(), self.params[f].reshape(-1), loss_scale)
            outs.append(y[:n_samples, :self.output_dim])
        return torch.stack(outs).to(torch.float32)

    def __getstate__(self) -> dict:
        # Native tcnn handles cannot be pickled or deep-copied; they are rebuilt lazily on first use.
        state = self.__dict__.copy()
        state['_tcnn_native'] = {}
        return state

    def extra_repr(self) -> str:
        c = self.config
        return (f'n_fields={self.n_fields}, n_levels={c.n_levels}, n_features_per_level={c.n_features_per_level}, '
                f'log2_hashmap_size={c.log2_hashmap_size}, resolution={c.base_resolution}->{c.finest_resolution}, '
                f'backend={self.backend!r}')
