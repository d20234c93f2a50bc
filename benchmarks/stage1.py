"""Stage-1 speed, in one run.

* CPU: seconds per image of the `fast` preset on ViT-S/14 at 448 px (real photos from $DVT_SHARED when
  set, else the bundled sample photos), split into feature extraction and field optimisation.
* CUDA GPU, when present: the paper's settings (768 views, 20k iterations, 518 px) on
  vit_base_patch14_dinov2 with random weights (timing only), TF32 matmuls as the CLI's default,
  amortised over a batch of images; with
  `--dense-table-adam` also with the table stepped by a dense Adam (the authors' code) instead of
  `HashTableAdam`; the fused Triton hash-grid kernel against the PyTorch reference, forward and backward;
  and one table Adam step, dense vs `HashTableAdam`.

    python benchmarks/stage1.py [--cpu-images 4] [--gpu-images 16] [--threads N] [--dense-table-adam]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from dvt_timm import DenoisedViT
from dvt_timm.cli import positive_int
from dvt_timm.data import image_to_tensor, list_images, load_image
from dvt_timm.fields import PRESETS, decompose, image_seed, image_view_features
from dvt_timm.fields.pipeline import resolve_settings
from dvt_timm.precision import bf16_is_native

sys.path.insert(0, str(Path(__file__).parent))
from encoding import bench_encoding, bench_table_adam, format_result, format_table_adam  # noqa: E402


def _photos(n: int):
    shared = os.environ.get('DVT_SHARED')
    folder = Path(shared, 'data', 'train_images') if shared else Path(__file__).parents[1] / 'examples' / 'assets'
    return list_images(folder)[:n]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_stage1(model: DenoisedViT, images, settings, device: torch.device, extract_batch: int = 32,
                report_every: int = 0) -> dict:
    """Wall seconds for extraction and optimisation of `images` (PIL or (3, S, S) tensors) as one batch.

    With `report_every`, the elapsed optimisation time is printed every that many iterations, so a run cut
    short by a time limit still leaves a measured rate behind."""
    backbone = model.backbone.to(device).eval()
    size = settings.image_size
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    settings = resolve_settings(settings, model.patch_size, device)  # amp, if unset, for this device
    seeds = [image_seed(settings.seed, str(k)) for k in range(len(images))]
    _sync(device)
    t0 = time.perf_counter()
    feats, coords = [], []
    for img, seed in zip(images, seeds):  # as denoise_images does it
        x = img if isinstance(img, torch.Tensor) else image_to_tensor(img, size, mean, std)
        f, xy = image_view_features(backbone, x, settings, seed, settings.amp, extract_batch)
        feats.append(f)
        coords.append(xy)
    batch = torch.stack(feats)
    feats.clear()
    _sync(device)
    t1 = time.perf_counter()
    if report_every:
        print(f'    extraction: {t1 - t0:.1f} s for the batch', flush=True)

    def report(step: int) -> None:
        if report_every and step % report_every == 0:
            _sync(device)
            print(f'    {step}/{settings.iterations} iterations: {time.perf_counter() - t1:.1f} s', flush=True)

    decompose(batch, torch.stack(coords).to(device), seeds, settings, progress=report)
    _sync(device)
    t2 = time.perf_counter()
    n = len(images)
    return dict(extract=(t1 - t0) / n, optimise=(t2 - t1) / n, total=(t2 - t0) / n, amp=settings.amp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cpu-images', type=positive_int, default=4, help='images in the CPU batch')
    parser.add_argument('--gpu-images', type=positive_int, default=16, help='images in the GPU batch (paper settings)')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--cpu-amp', action=argparse.BooleanOptionalAction, default=None,
                        help='CPU: bf16 autocast for extraction (default: where bf16 is native, as the preset does)')
    parser.add_argument('--dense-table-adam', action='store_true',
                        help='GPU: also time the paper settings with a dense Adam on the hash tables')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = DenoisedViT('vit_small_patch14_dinov2')
    fast = PRESETS['fast'].with_overrides(amp=args.cpu_amp)
    photos = [load_image(p) for p in _photos(args.cpu_images)]
    r = time_stage1(model, photos, fast, torch.device('cpu'))
    print(f'CPU ({torch.get_num_threads()} threads), preset fast on vit_small_patch14_dinov2 at {fast.image_size} px, '
          f'{fast.n_views} views, {fast.iterations} iterations, batch of {len(photos)} images, extraction in '
          f'{"bf16 autocast" if r["amp"] else "fp32"} (native bf16: {bf16_is_native("cpu")}):')
    print(f'  {r["total"]:.1f} s/image  (extraction {r["extract"]:.1f} s, optimisation {r["optimise"]:.1f} s)')

    if not torch.cuda.is_available():
        print('no CUDA GPU: the paper-settings GPU timing and the fused-kernel ratio were not measured')
        return
    device = torch.device('cuda')
    torch.set_float32_matmul_precision('high')  # TF32 for the fields' MLPs, as `dvt-timm denoise-images` does
    paper = PRESETS['paper'].with_overrides(image_size=518)
    big = DenoisedViT('vit_base_patch14_dinov2')
    images = [torch.randn(3, 518, 518) for _ in range(args.gpu_images)]
    print(f'{torch.cuda.get_device_name()}: paper settings ({paper.n_views} views, {paper.iterations} iterations, '
          f'518 px) on vit_base_patch14_dinov2, batch of {len(images)} images:')
    for sparse in (True, False) if args.dense_table_adam else (True,):
        r = time_stage1(big, images, paper.with_overrides(sparse_table_adam=sparse), device, extract_batch=64,
                        report_every=2000)
        print(f'  {r["total"]:.2f} s/image amortised  (extraction {r["extract"]:.2f} s, optimisation '
              f'{r["optimise"]:.2f} s){"" if sparse else ", dense table Adam"}', flush=True)
    print(format_result(bench_encoding(device, n_fields=32, n_samples=2048)))
    print(format_table_adam(bench_table_adam(device, n_fields=32, n_samples=2048)))


if __name__ == '__main__':
    main()
