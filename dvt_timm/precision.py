"""Where bf16 autocast pays: devices that compute in bf16 natively.

Autocast's bf16 matmuls are fast on GPUs with bf16 units (Ampere and newer, ROCm) and on CPUs with bf16
instructions (AVX512-BF16 or AMX on x86, oneDNN's bf16 on Arm). Elsewhere PyTorch falls back to slow
generic kernels: on a 2-core AVX2 AMD EPYC, stage 1's feature extraction (`benchmarks/stage1.py --cpu-amp`)
took 148.4 s per image under bf16 autocast against 30.3 s in fp32, and a stage-2 step
(`benchmarks/stage2.py`) 26.7 s against 1.29 s.
"""
import platform
from typing import Union

import torch

__all__ = ['bf16_is_native']

_X86 = ('x86_64', 'amd64', 'i386', 'i686', 'x86')


def bf16_is_native(device: Union[str, torch.device]) -> bool:
    """True when `device` runs bf16 matmuls in hardware, so that bf16 autocast is faster than fp32."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == 'cpu':
        if platform.machine().lower() in _X86:  # oneDNN also "supports" bf16 on plain AVX-512, by emulation
            return any(getattr(torch.cpu, check, lambda: False)()
                       for check in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'))
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
