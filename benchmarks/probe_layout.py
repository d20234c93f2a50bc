"""How much of a small set's linear-probe mIoU is layout: the probe on raw and denoised features, each with
and without position channels appended, and on the position channels alone (no pixel content at all).

Position channels: sin / cos of the patch row and column at 4 frequencies (16 channels) and the products of
every row channel with every column channel (64), so a linear head can draw blobs, not only ramps. The
features are the shipped denoiser's at 448 px on the real DINOv2 ViT-S/14 ($DVT_SHARED), cached by
`extract_features` (`--cache`); each seed is one held-out split (`--folds K` for K-fold cross-validation).

    DVT_SHARED=../shared python benchmarks/probe_layout.py --seeds 0 1 2 3 4 5 6 7
    DVT_SHARED=../shared python benchmarks/probe_layout.py --folds 14 --seeds 0   # leave-one-image-out on VOC
"""
import argparse
import math
import os
import time
from pathlib import Path

import timm
import torch

import dvt_timm  # noqa: F401  (registers the models)
from dvt_timm.evaluation import LabeledFolder, extract_features, linear_probe


def position_channels(h: int, w: int) -> torch.Tensor:
    """(80, h, w) Fourier features of the patch position and their row x column products."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing='ij')
    rows = [f(math.pi * k * ys) for k in (1, 2, 4, 8) for f in (torch.sin, torch.cos)]
    cols = [f(math.pi * k * xs) for k in (1, 2, 4, 8) for f in (torch.sin, torch.cos)]
    return torch.stack(rows + cols + [r * c for r in rows for c in cols])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', default='voc_val_samples', help='labelled folder under $DVT_SHARED/data')
    ap.add_argument('--ignore-index', type=int)
    ap.add_argument('--seeds', type=int, nargs='+', default=[0])
    ap.add_argument('--folds', type=int, help='K-fold cross-validation instead of a held-out quarter')
    ap.add_argument('--cache', default='runs/feat_cache')
    args = ap.parse_args()
    shared = Path(os.environ.get('DVT_SHARED', '../shared'))
    folder = LabeledFolder(shared / 'data' / args.data, ignore_index=args.ignore_index)
    model = timm.create_model('dvt_vit_small_patch14_dinov2.dvt_timm_photos', pretrained=True,
                              backbone_checkpoint=shared / 'weights' / 'dinov2_vits14.safetensors')
    fs = extract_features(model, folder.images, names=folder.names, variants=('raw', 'denoised'),
                          cache_dir=args.cache, progress=True)
    n, _, h, w = fs.maps['raw'].shape
    pos = position_channels(h, w)[None].expand(n, -1, -1, -1)
    inputs = {'position only': pos.clone()}
    for v in ('raw', 'denoised'):
        inputs[v] = fs.maps[v].float()
        inputs[f'{v} + position'] = torch.cat([fs.maps[v].float(), pos], 1)
    print(f'{args.data}: {n} images, {folder.num_classes} classes, linear-probe mIoU %'
          + (f', {args.folds}-fold' if args.folds else ', a quarter held out'))
    print('seed  ' + '  '.join(f'{k:>19}' for k in inputs))
    for seed in args.seeds:
        t = time.perf_counter()
        scores = [100 * linear_probe(x, folder.labels, folder.num_classes, seed=seed, folds=args.folds)['miou']
                  for x in inputs.values()]
        print(f'{seed:>4}  ' + '  '.join(f'{s:>19.2f}' for s in scores) + f'   ({time.perf_counter() - t:.0f} s)',
              flush=True)


if __name__ == '__main__':
    main()
