"""Where bf16 autocast pays: devices that compute in bf16 natively.

Autocast's bf16 matmuls are fast on GPUs with bf16 units (Ampere and newer, ROCm) and on CPUs with bf16
instructions (AVX512-BF16 or AMX on x86, oneDNN's bf16 on Arm). Elsewhere PyTorch falls back to slow
generic kernels: on a 2-core AVX2 AMD EPYC a DINOv2 ViT-S/14 pass at 448 px took 3.3 s under bf16
autocast against 0.56 s in fp32, and a 2048x2048 matmul ran at 0.3 GFLOP/s against 138.
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
