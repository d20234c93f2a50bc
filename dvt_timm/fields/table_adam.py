"""Adam for hash-grid tables that skips the entries a step did not touch (tiny-cuda-nn's rule).

A step of stage 1 samples 2,048 patches per image; with the paper's 16-level grid they touch at most
16 x 4 x 2,048 of an image's 2.47M table entries (~5%), yet a dense Adam step reads and writes all of
them: 28 bytes per value, about 0.55 GB per image and step, ~4 s per image over 20k steps on an H100
before anything else runs. tiny-cuda-nn's own Adam (the optimizer InstantNGP trains hash grids with)
leaves a value alone in a step where its gradient is exactly zero and keeps a step count per value for
the bias correction. `HashTableAdam` does the same, so a step costs a read of the gradient plus the
touched values. A value that receives a gradient in every step is updated exactly as `torch.optim.Adam`
updates it (L2 weight decay added to the gradient, as there).
"""
import logging
import math
from typing import Dict, Iterable, Tuple

import torch
from torch import Tensor

from .encoding import has_triton

__all__ = ['HashTableAdam', 'adam_step_touched']

_logger = logging.getLogger(__name__)
_TRITON_STEP_USABLE: Dict[int, bool] = {}  # CUDA device index -> the fused step compiled and ran there


def adam_step_touched(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One Adam step, in place, on the values of `param` whose gradient is non-zero (PyTorch reference).

    `steps` (int32, like `param`) counts each value's own steps. Works on rows of the last dimension (a
    table entry's features, touched together), so the gathers move whole rows. Any device; on CUDA it
    synchronises once (the compaction of the touched rows)."""
    width = param.shape[-1] if param.dim() else 1
    g_all = grad.reshape(-1, width)
    rows = g_all.ne(0).any(1).nonzero().squeeze(1)
    if not rows.numel():
        return
    p_all, m_all, v_all, s_all = (t.view(-1, width) for t in (param, exp_avg, exp_avg_sq, steps))
    g, p, m, v, s = (t.index_select(0, rows) for t in (g_all, p_all, m_all, v_all, s_all))
    live = g.ne(0)  # a touched entry's feature may still have an exactly zero gradient: it is skipped too
    if weight_decay:
        g = g + weight_decay * p
    t = s + live.to(torch.int32)
    m_new = m.lerp(g, 1 - beta1)
    v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
    tf = t.clamp_min(1).to(torch.float32)
    bias1 = 1 - torch.exp(tf * math.log(beta1)) if beta1 else torch.ones_like(tf)
    bias2_sqrt = (1 - torch.exp(tf * math.log(beta2))).sqrt() if beta2 else torch.ones_like(tf)
    p_new = p - (lr / bias1) * m_new / (v_new.sqrt() / bias2_sqrt + eps)
    p_all.index_copy_(0, rows, torch.where(live, p_new, p))
    m_all.index_copy_(0, rows, torch.where(live, m_new, m))
    v_all.index_copy_(0, rows, torch.where(live, v_new, v))
    s_all.index_copy_(0, rows, t)


class HashTableAdam(torch.optim.Optimizer):
    """Adam whose step skips every value with an exactly zero gradient, with per-value step counts.

    For hash-grid tables (`MultiHashGrid.params`); on CUDA with Triton it is one fused kernel that reads
    only the gradient of untouched values, elsewhere `adam_step_touched`. Hyper-parameters as in
    `torch.optim.Adam`; a scheduler may change `lr` per group as usual.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f'lr must be positive, got {lr}')
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f'betas must be in [0, 1), got {betas}')
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group['betas']
            for p in group['params']:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.dtype != torch.float32 or not p.is_contiguous():
                    raise ValueError('HashTableAdam takes contiguous fp32 parameters with dense gradients')
                state = self.state[p]
                if not state:
                    state['exp_avg'] = torch.zeros_like(p)
                    state['exp_avg_sq'] = torch.zeros_like(p)
                    state['steps'] = torch.zeros_like(p, dtype=torch.int32)
                args = (p, p.grad.contiguous(), state['exp_avg'], state['exp_avg_sq'], state['steps'], group['lr'],
                        beta1, beta2, group['eps'], group['weight_decay'])
                if not (p.is_cuda and self._triton_step(*args)):
                    adam_step_touched(*args)
        return loss

    @staticmethod
    def _triton_step(param: Tensor, *args) -> bool:
        """The fused step, where Triton can build it (it compiles its launcher with the system's C compiler
        on first use, which slim containers lack); False after a first failure on a device, with a warning."""
        index = param.device.index if param.device.index is not None else torch.cuda.current_device()
        if not has_triton() or not _TRITON_STEP_USABLE.get(index, True):
            return False
        from .encoding_triton import adam_step_touched_triton
        try:
            adam_step_touched_triton(param, *args)
        except Exception as e:
            if _TRITON_STEP_USABLE.get(index):  # it ran here before: a real error, not a missing toolchain
                raise
            _logger.warning('Triton Adam step unusable on cuda:%d (%s: %s); using the PyTorch reference',
                            index, type(e).__name__, e)
            _TRITON_STEP_USABLE[index] = False
            return False
        _TRITON_STEP_USABLE[index] = True
        return True
