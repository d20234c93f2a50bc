"""Throughput of stage-2 training (the generalizable denoiser): samples per second.

Times the trainer's own `train_step` (forward, MSE + cosine loss, backward, AdamW step) on random
(raw, F) pairs already in memory, so the figure is the compute ceiling:
  - CPU, fp32: ViT-S/14 width (C=384) at 448 px, a 32x32 token grid;
  - CUDA (when present): the same, and ViT-B/14 (C=768) at 518 px, 37x37 tokens, in fp32 and bf16 autocast.
With `--io`, a second CPU figure also reads fp16 stage-1 files from disk through the training
DataLoader (`--workers` processes), which is what a real run sees.

    python benchmarks/stage2.py [--iters 10] [--batch 8] [--gpu-batch 64] [--threads N] [--io --workers 2]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dvt_timm.denoiser import Denoiser
from dvt_timm.fields.outputs import write_stage1
from dvt_timm.precision import bf16_is_native
from dvt_timm.training.data import Stage1Dataset, scan_stage1
from dvt_timm.training.trainer import default_lr, train_step


def _setup(C: int, device: str):
    torch.manual_seed(0)
    model = Denoiser(C, 37).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=default_lr(64), betas=(0.9, 0.999), weight_decay=1e-5)
    return model, opt


def bench_compute(C: int, grid: int, batch: int, device: str, amp: bool, iters: int) -> float:
    model, opt = _setup(C, device)
    raw = torch.randn(batch, grid, grid, C, device=device)
    clean = raw - 0.1 * torch.randn(1, grid, grid, C, device=device)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    for _ in range(3):  # warm-up: allocator, kernel selection
        train_step(model, opt, raw, clean, amp)
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        train_step(model, opt, raw, clean, amp)
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    where = torch.cuda.get_device_name() if device == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'C={C} {grid}x{grid} tokens, batch {batch}, {"bf16 autocast" if amp else "fp32"}, {where}: '
          f'median step {med * 1e3:8.1f} ms -> {batch / med:8.1f} samples/s')
    return batch / med


def bench_io(C: int, grid: int, batch: int, workers: int, iters: int) -> float:
    """CPU steps fed from fp16 stage-1 files on disk through a DataLoader."""
    n = batch * (iters + 3)
    with tempfile.TemporaryDirectory() as tmp:
        meta = {'model': 'vit_small_patch14_dinov2.lvd142m', 'input_size': f'{grid * 14},{grid * 14}', 'patch_size': '14'}
        for i in range(n):
            raw = torch.randn(grid, grid, C)
            write_stage1(Path(tmp) / f'{i:05d}.safetensors', raw, 0.9 * raw, meta)
        ds = Stage1Dataset(scan_stage1(tmp, log=False).items)
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
        model, opt = _setup(C, 'cpu')
        it = iter(loader)
        for _ in range(3):
            raw, clean, usable = next(it)
            train_step(model, opt, raw, clean, usable=usable)
        t = time.perf_counter()
        for raw, clean, usable in it:
            train_step(model, opt, raw, clean, usable=usable)
        elapsed = time.perf_counter() - t
    rate = batch * iters / elapsed
    print(f'C={C} {grid}x{grid} tokens, batch {batch}, fp32, from fp16 files with {workers} workers, '
          f'CPU, {torch.get_num_threads()} threads: {elapsed / iters * 1e3:8.1f} ms/step -> {rate:8.1f} samples/s')
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--batch', type=int, default=8, help='CPU batch (default 8)')
    parser.add_argument('--gpu-batch', type=int, default=64, help='GPU batch (default 64, the authors\' global batch)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    parser.add_argument('--io', action='store_true', help='also time CPU training fed from stage-1 files on disk')
    parser.add_argument('--workers', type=int, default=2, help='DataLoader workers for --io (default 2)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}; native bf16 on the CPU: {bf16_is_native("cpu")}')
    for amp in (False, True):  # bf16 autocast pays off on CPUs with bf16 units (AMX / AVX512-BF16) only
        bench_compute(384, 32, args.batch, 'cpu', amp, args.iters)
    if args.io:
        bench_io(384, 32, args.batch, args.workers, args.iters)
    if torch.cuda.is_available():
        for C, grid in ((384, 32), (768, 37)):
            for amp in (False, True):
                bench_compute(C, grid, args.gpu_batch, 'cuda', amp, max(args.iters, 50))
    else:
        print('no CUDA GPU: the GPU figures (C=384 32x32 and C=768 37x37, batch '
              f'{args.gpu_batch}, fp32 and bf16) were not measured')


if __name__ == '__main__':
    main()
