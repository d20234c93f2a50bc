"""Microbenchmark of the multi-field hash-grid encoding (stage 1): torch reference vs fused Triton vs tcnn,
and of one optimizer step on its tables: torch's dense fused Adam vs `HashTableAdam`.

For the paper preset's grid (16 levels, F=8, 2^20 table, resolution 16->1024; `--grid fast` for the CPU
preset's) and a few (fields x samples) sizes, prints the median time of a forward (autograd on, as in
training) and of forward+backward (param grads set to None first, as `zero_grad(set_to_none=True)` does),
plus the fused/reference speed-ups. All backends run on the same parameters. On a machine without a CUDA
GPU only the torch reference is timed (on the CPU).

    python benchmarks/encoding.py [--iters N] [--sizes 32x2048,8x8192] [--threads N] [--grid paper|fast]

The optimizer step is timed on the gradient of a real forward+backward (the same fields and samples), so the
share of table values it touches is the one stage 1 sees.

`bench_encoding(device, ...)` and `bench_table_adam(device, ...)` return the numbers as dicts for other
scripts (benchmarks/stage1.py).
"""
import argparse
import statistics
import time
from typing import Dict, Optional, Sequence, Tuple

import torch

from dvt_timm.fields import PRESETS
from dvt_timm.fields.encoding import HashGridConfig, MultiHashGrid, has_tcnn, has_triton
from dvt_timm.fields.table_adam import HashTableAdam


def _timer(device: torch.device):
    """Return a function timing `fn()` in seconds: CUDA events on GPU, perf_counter on CPU."""
    if device.type == 'cuda':
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def available_backends(device: torch.device) -> Tuple[str, ...]:
    """Backends that can run on `device`, reference first."""
    if device.type != 'cuda':
        return ('torch',)
    return ('torch',) + (('triton',) if has_triton() else ()) + (('tcnn',) if has_tcnn() else ())


def bench_encoding(
        device: str = 'cuda',
        config: Optional[HashGridConfig] = None,
        n_fields: int = 32,
        n_samples: int = 2048,
        iters: int = 20,
        warmup: int = 3,
        backends: Optional[Sequence[str]] = None,
        seed: int = 0,
) -> Dict:
    """Time forward and forward+backward of `MultiHashGrid` for each backend on identical parameters.

    Returns ``{'device', 'config', 'n_fields', 'n_samples', 'iters', 'times': {backend: {'fwd', 'fwd_bwd',
    'bwd'}}, 'speedup': {backend: {'fwd', 'bwd', 'fwd_bwd'}}}``; times are medians in seconds ('bwd' is
    the difference of the two medians), speed-ups are reference time / backend time.
    """
    device = torch.device(device)
    config = config or HashGridConfig()
    backends = tuple(backends) if backends is not None else available_backends(device)
    g = torch.Generator(device='cpu').manual_seed(seed)
    enc = MultiHashGrid(config, n_fields=n_fields, backend='torch').to(device)
    coords = torch.rand(n_fields, n_samples, 2, generator=g).to(device)
    grad_out = torch.randn(n_fields, n_samples, config.output_dim, generator=g).to(device)
    timer = _timer(device)

    def fwd():
        return enc(coords)

    def fwd_bwd():
        enc.params.grad = None
        enc(coords).backward(grad_out)

    times = {}
    for name in backends:
        enc.backend = name
        for _ in range(warmup):  # compile / autotune caches, allocator warm-up
            fwd_bwd()
        t_fwd = [timer(fwd) for _ in range(iters)]
        t_fb = [timer(fwd_bwd) for _ in range(iters)]
        enc.params.grad = None
        f, fb = statistics.median(t_fwd), statistics.median(t_fb)
        times[name] = {'fwd': f, 'fwd_bwd': fb, 'bwd': max(fb - f, 0.0)}

    speedup = {}
    if 'torch' in times:
        ref = times['torch']
        for name, t in times.items():
            if name != 'torch':
                speedup[name] = {k: ref[k] / t[k] if t[k] > 0 else float('inf') for k in ('fwd', 'bwd', 'fwd_bwd')}
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    return {'device': name, 'config': config, 'n_fields': n_fields, 'n_samples': n_samples, 'iters': iters,
            'times': times, 'speedup': speedup}


def bench_table_adam(device: str = 'cuda', config: Optional[HashGridConfig] = None, n_fields: int = 32,
                     n_samples: int = 2048, iters: int = 20, warmup: int = 3, seed: int = 0) -> Dict:
    """Median seconds of one optimizer step on the tables of `n_fields` fields, with the gradient of
    `n_samples` samples per field: torch's fused Adam over every value ('dense') vs `HashTableAdam`
    ('sparse'). Returns ``{'device', 'n_fields', 'n_samples', 'touched', 'times': {'dense', 'sparse'}}``,
    'touched' being the share of values with a non-zero gradient."""
    device = torch.device(device)
    config = config or HashGridConfig()
    g = torch.Generator(device='cpu').manual_seed(seed)
    enc = MultiHashGrid(config, n_fields=n_fields).to(device)
    coords = torch.rand(n_fields, n_samples, 2, generator=g).to(device)
    enc(coords).backward(torch.randn(n_fields, n_samples, config.output_dim, generator=g).to(device))
    grad = enc.params.grad
    timer = _timer(device)
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-15, weight_decay=1e-5)
    times = {}
    for name, make in (('dense', lambda p: torch.optim.Adam([p], fused=True, **hp)),
                       ('sparse', lambda p: HashTableAdam([p], **hp))):
        param = torch.nn.Parameter(enc.params.detach().clone())
        param.grad = grad
        opt = make(param)
        for _ in range(warmup):
            opt.step()
        times[name] = statistics.median(timer(opt.step) for _ in range(iters))
        del opt, param
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    return {'device': name, 'n_fields': n_fields, 'n_samples': n_samples, 'touched': grad.ne(0).float().mean().item(),
            'times': times}


def format_table_adam(res: Dict) -> str:
    t = res['times']
    return (f'  table Adam step, {res["n_fields"]} fields, gradient of {res["n_samples"]} samples each '
            f'({100 * res["touched"]:.1f}% of the values): dense fused Adam {t["dense"] * 1e3:.3f} ms, '
            f'HashTableAdam {t["sparse"] * 1e3:.3f} ms ({t["dense"] / t["sparse"]:.1f}x)')


def format_result(res: Dict) -> str:
    lines = [f'  {res["n_fields"]} fields x {res["n_samples"]} samples ({res["iters"]} iters, medians)']
    for name, t in res['times'].items():
        lines.append(f'    {name:<7} fwd {t["fwd"] * 1e3:9.3f} ms   fwd+bwd {t["fwd_bwd"] * 1e3:9.3f} ms'
                     f'   (bwd {t["bwd"] * 1e3:9.3f} ms)')
    for name, s in res['speedup'].items():
        lines.append(f'    {name}/torch speed-up: fwd {s["fwd"]:.1f}x   bwd {s["bwd"]:.1f}x   fwd+bwd {s["fwd_bwd"]:.1f}x')
    return '\n'.join(lines)


def _parse_sizes(text: str) -> Tuple[Tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in item.lower().split('x')) for item in text.split(',') if item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=None, help='timed iterations (default: 50 on GPU, 5 on CPU)')
    parser.add_argument('--sizes', type=str, default=None,
                        help='comma-separated FIELDSxSAMPLES (default: 32x2048,8x8192, plus 64x4096 on GPU)')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    parser.add_argument('--grid', choices=sorted(PRESETS), default='paper', help="the preset's hash grid (default: paper)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    iters = args.iters or (50 if cuda else 5)
    sizes = _parse_sizes(args.sizes) if args.sizes else ((32, 2048), (8, 8192)) + (((64, 4096),) if cuda else ())
    cfg = PRESETS[args.grid].hash
    backends = available_backends(torch.device(device))
    print(f'hash grid: {cfg.n_levels} levels x F={cfg.n_features_per_level}, 2^{cfg.log2_hashmap_size} table, '
          f'resolution {cfg.base_resolution}->{cfg.finest_resolution}, {cfg.n_params_per_field:,} entries/field, fp32')
    for i, (n_fields, n_samples) in enumerate(sizes):
        res = bench_encoding(device, cfg, n_fields, n_samples, iters=iters, warmup=3 if cuda else 1)
        if i == 0:
            print(f'device: {res["device"]}; backends: {", ".join(backends)}')
        print(format_result(res))
        # On the CPU at most 4 fields: the Adam state of 32 paper-grid tables alone would take 10 GB there.
        print(format_table_adam(bench_table_adam(device, cfg, n_fields if cuda else min(n_fields, 4), n_samples,
                                                 iters=iters, warmup=3 if cuda else 1)))
    if not cuda:
        print('no CUDA GPU: the fused Triton kernel (and tcnn) were not measured; only the torch reference ran')
    elif 'triton' not in backends:
        print('triton is not installed: the fused kernel was not measured')


if __name__ == '__main__':
    main()
