"""Forward-time overhead of the denoiser: plain backbone vs DenoisedViT (denoising on), 518x518, batch 4.

At another `--size` (448: our shipped denoiser's) the position embedding is also resized on every call.

Runs ViT-S/14 in fp32 on the CPU, and ViT-B/14 in bf16 on a CUDA GPU when one is present. The two
forwards alternate within one process so drift in machine speed hits both equally; medians are printed
with their ratio (the extra block is one of 12, so about 1.08 is expected).

    python benchmarks/overhead.py [--iters 10] [--threads N] [--size 518] [--device cpu|cuda]
"""
import argparse
import statistics
import time

import torch

from dvt_timm import DenoisedViT


def _time(fn, x, sync) -> float:
    sync()
    t = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - t


def bench(backbone: str, device: str, dtype: torch.dtype, iters: int, batch: int = 4, size: int = 518) -> None:
    model = DenoisedViT(backbone).to(device).eval()
    plain = model.backbone.forward_features
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        for _ in range(2):  # warm-up: allocator, kernels
            plain(x), model.forward_features(x)
        t_plain, t_dvt = [], []
        for _ in range(iters):
            t_plain.append(_time(plain, x, sync))
            t_dvt.append(_time(model.forward_features, x, sync))
    a, b = statistics.median(t_plain), statistics.median(t_dvt)
    name = torch.cuda.get_device_name() if device == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{backbone} {str(dtype).split(".")[-1]} on {name}, batch {batch}, {size}x{size}, {iters} iters')
    print(f'  plain backbone   median {a * 1e3:9.1f} ms')
    print(f'  DenoisedViT (on) median {b * 1e3:9.1f} ms')
    print(f'  ratio {b / a:.3f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    parser.add_argument('--size', type=int, default=518, help='square input side, a multiple of 14 (default: 518)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default=None,
                        help='only this device (default: the CPU, and the GPU when there is one)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device in (None, 'cpu'):
        bench('vit_small_patch14_dinov2', 'cpu', torch.float32, args.iters, size=args.size)
    if args.device in (None, 'cuda') and torch.cuda.is_available():
        bench('vit_base_patch14_dinov2', 'cuda', torch.bfloat16, max(args.iters, 50), size=args.size)
    elif args.device in (None, 'cuda'):
        print('no CUDA GPU: the vit_base_patch14_dinov2 bf16 GPU figure was not measured')


if __name__ == '__main__':
    main()
