"""Quality/time trade-off of stage-1 settings on the CPU (how the `fast` preset was chosen).

For real photos and the real DINOv2 ViT-S/14 ($DVT_SHARED), each candidate setting is timed (seconds
per image, one batch) and its F is compared with a heavy reference run (many views, long optimisation):
the mean centred cosine between the two F maps says how close a cheap setting gets to a well-converged
decomposition. The label-free artifact metrics of F (|cos| with the zero-input map, variance share of
the per-position mean) are printed next to raw's.

    DVT_SHARED=../shared python benchmarks/stage1_presets.py [--images 6]
    DVT_SHARED=../shared python benchmarks/stage1_presets.py --lr 0.01 --full-view-share 0   # the first preset's
"""
import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dvt_timm import DenoisedViT
from dvt_timm.data import list_images, load_image
from dvt_timm.evaluation import variance_share, zero_input_cosine, zero_input_map
from dvt_timm.fields import PRESETS, HashGridConfig, denoise_images

CANDIDATES = {
    'fast (preset: 36 views, 300 it, 1024 samples)': {},
    '24 views, 600 it, 2048 samples (first try)': dict(n_views=24, iterations=600, samples_per_step=2048),
    '12 views, 300 it, 2048 samples': dict(n_views=12, samples_per_step=2048),
    '24 views, 300 it, 2048 samples': dict(n_views=24, samples_per_step=2048),
    '24 views, 600 it, 1024 samples': dict(n_views=24, iterations=600),
    '24 views, 1200 it, 2048 samples': dict(n_views=24, iterations=1200, samples_per_step=2048),
    '48 views, 600 it, 2048 samples': dict(n_views=48, iterations=600, samples_per_step=2048),
    '48 views, 200 it, 1024 samples': dict(n_views=48, iterations=200),
    '48 views, 300 it, 1024 samples': dict(n_views=48),
    '64 views, 300 it, 1024 samples': dict(n_views=64),
    '24 views, 600 it, 2048 samples, paper hash grid': dict(n_views=24, iterations=600, samples_per_step=2048,
                                                           hash=HashGridConfig()),
}
REFERENCE = dict(n_views=96, iterations=2000, samples_per_step=2048)


def centred_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two (h, w, C) maps after removing each one's per-channel mean."""
    a, b = a - a.mean((0, 1)), b - b.mean((0, 1))
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=6, help='photos (spread over the train_images folder)')
    parser.add_argument('--lr', type=float, help="every row's learning rate (default: the fast preset's)")
    parser.add_argument('--full-view-share', type=float, help="every row's full-view share (default: the preset's)")
    args = parser.parse_args()
    shared = Path(os.environ['DVT_SHARED'])
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=shared / 'weights' / 'dinov2_vits14.safetensors')
    paths = list_images(shared / 'data' / 'train_images')
    paths = paths[:: max(len(paths) // args.images, 1)][:args.images]
    images, keys = [load_image(p) for p in paths], [p.stem for p in paths]
    fast = PRESETS['fast'].with_overrides(lr=args.lr, full_view_share=args.full_view_share)

    def run(overrides):
        settings = fast.with_overrides(**overrides)
        start = time.perf_counter()
        results = denoise_images(model, images, settings, keys=keys)
        return results, (time.perf_counter() - start) / len(images)

    reference, ref_time = run(REFERENCE)
    raw = torch.stack([r.raw for r in reference]).permute(0, 3, 1, 2)
    zero = zero_input_map(model, fast.image_size)
    print(f'{len(images)} photos, vit_small_patch14_dinov2 at {fast.image_size} px, CPU {torch.get_num_threads()} threads')
    print(f'reference: {REFERENCE} -> {ref_time:.1f} s/image')
    print(f'raw: |cos| zero-input {zero_input_cosine(raw, zero):.3f}, variance share {variance_share(raw):.3f}\n')
    print('| setting | s/image | cos(F, F_ref) | |cos| zero-input | variance share |')
    print('|---|---|---|---|---|')
    for name, overrides in {**CANDIDATES, f'reference ({REFERENCE["n_views"]} views, {REFERENCE["iterations"]} it)': None}.items():
        results, sec = (reference, ref_time) if overrides is None else run(overrides)
        den = torch.stack([r.denoised for r in results])
        conv = sum(centred_cos(r.denoised, q.denoised) for r, q in zip(results, reference)) / len(results)
        maps = den.permute(0, 3, 1, 2)
        print(f'| {name} | {sec:.1f} | {conv:.3f} | {zero_input_cosine(maps, zero):.3f} | {variance_share(maps):.3f} |',
              flush=True)


if __name__ == '__main__':
    main()
