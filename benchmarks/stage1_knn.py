"""kNN segmentation of stage-1 F against raw for several optimisation settings (how `fast`'s lr and full-view
share were chosen).

The views of every image of a labelled folder are rendered and passed through the real DINOv2 ViT-S/14
($DVT_SHARED) once, with the `fast` preset's views, and cached (`--cache`); each candidate then only re-runs
the optimisation on the same features, so the rows differ in the optimisation alone. For each row: kNN mIoU
(centroid and patch banks, leave-one-image-out) of F, the artifact metrics of F (variance share of the
per-position mean, mean |cos| with the zero-input map), the cosine of F + G with the raw map of the full view
(how well the fields fit), and the optimisation time per image; then the same scores for the raw map minus
G (the positional term alone removed, no field in between) and the mean norms of raw, G and raw - F - G
(what the field does not fit), and, with the first seed, raw + G, G alone and G averaged over the images (how
much class information the positional term itself carries on the set). With several `--seed-offsets`, a last
row scores F averaged over them. `--table-adam dense sparse` runs every row with both table optimizers (torch's
Adam over the whole hash table, `HashTableAdam`), and `--grid paper --iterations N --images N` the paper's hash
grid on a few images; where a row has several F maps, their mutual agreement (mean centred cosine) is printed.

    DVT_SHARED=../shared python benchmarks/stage1_knn.py [--data voc_val_samples] [--cache /tmp/dvt_knn_cache]
    DVT_SHARED=../shared python benchmarks/stage1_knn.py --data coco_train_semseg --ignore-index 0 --rows 4 2
    DVT_SHARED=../shared python benchmarks/stage1_knn.py --rows 4 --seed-offsets 0 1 2   # run-to-run spread
    DVT_SHARED=../shared python benchmarks/stage1_knn.py --rows 4 --seed-offsets 0 1 --table-adam dense sparse
    DVT_SHARED=../shared python benchmarks/stage1_knn.py --rows 2 --grid paper --iterations 1000 --images 6 \\
        --seed-offsets 0 1 --table-adam dense sparse   # the paper's hash grid: does HashTableAdam change F?
"""
import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dvt_timm import DenoisedViT
from dvt_timm.checkpoint import atomic_write
from dvt_timm.cli import positive_int
from dvt_timm.data import image_to_tensor, load_image
from dvt_timm.evaluation import LabeledFolder, knn_segmentation, variance_share, zero_input_cosine, zero_input_map
from dvt_timm.fields import PRESETS, decompose, image_seed, image_view_features

sys.path.insert(0, str(Path(__file__).parent))
from stage1_presets import centred_cos  # noqa: E402

CANDIDATES = {
    'lr 0.01, full-view share 0 (fast, first)': dict(lr=0.01, full_view_share=0.0),
    'lr 0.03, full-view share 0': dict(lr=0.03, full_view_share=0.0),
    'lr 0.01, full-view share 0.5': dict(lr=0.01, full_view_share=0.5),
    'lr 0.03, full-view share 0.25 (fast, second)': dict(lr=0.03, full_view_share=0.25),
    'lr 0.03, full-view share 0.5 (fast)': dict(lr=0.03, full_view_share=0.5),
}


def cached_views(model: DenoisedViT, folder: LabeledFolder, cache: Path) -> list:
    """Per image: {'feats': (V, K, K, C) bf16, 'coords': (V, K, K, 2), 'seed'}, computed once."""
    settings = PRESETS['fast']
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    cache.mkdir(parents=True, exist_ok=True)
    items = []
    for path, name in zip(tqdm(folder.images, desc='views'), folder.names):
        file = cache / f'{Path(name).name}.pt'
        if not file.is_file():  # the CLI's key (file stem), seed and views
            seed = image_seed(settings.seed, Path(name).name)
            pixels = image_to_tensor(load_image(path), settings.image_size, mean, std)
            feats, coords = image_view_features(model.backbone.eval(), pixels, settings, seed, amp=True)
            item = {'feats': feats.to(torch.bfloat16), 'coords': coords, 'seed': seed}
            atomic_write(file, lambda tmp: torch.save(item, tmp))
        items.append(torch.load(file, weights_only=True))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default='voc_val_samples', help='labelled folder under $DVT_SHARED/data')
    parser.add_argument('--ignore-index', type=int, help='label value to ignore (COCO 0, CamVid 11)')
    parser.add_argument('--cache', type=Path, default=Path('/tmp/dvt_knn_cache'), help='view-feature cache')
    parser.add_argument('--batch-images', type=int, default=8)
    parser.add_argument('--rows', type=int, nargs='+', help='run only these rows of CANDIDATES (0-based)')
    parser.add_argument('--seed-offsets', type=int, nargs='+', default=[0],
                        help="also re-run each row with the images' optimisation seeds shifted by these (same views): "
                             "how much F's scores move from one optimisation to another")
    parser.add_argument('--table-adam', choices=('dense', 'sparse'), nargs='+', default=['dense'],
                        help="the hash table's optimizer: torch's Adam over the whole table (the fast preset's) or "
                             "HashTableAdam; with both, every row runs with each (default: dense)")
    parser.add_argument('--grid', choices=sorted(PRESETS), default='fast',
                        help="this preset's hash grid (default: fast)")
    parser.add_argument('--iterations', type=positive_int,
                        help="every row's optimisation steps (default: the fast preset's)")
    parser.add_argument('--images', type=positive_int, help='only the first N images of the set')
    args = parser.parse_args()
    shared = Path(os.environ['DVT_SHARED'])
    model = DenoisedViT('vit_small_patch14_dinov2', backbone_checkpoint=shared / 'weights' / 'dinov2_vits14.safetensors')
    folder = LabeledFolder(shared / 'data' / args.data, ignore_index=args.ignore_index, limit=args.images)
    fast = PRESETS['fast']  # the cache holds this preset's views: one folder per view count and size
    items = cached_views(model, folder, args.cache / args.data / f'{fast.n_views}views_{fast.image_size}px')

    reference = zero_input_map(model, PRESETS['fast'].image_size)

    def scores(maps: torch.Tensor) -> str:
        knn = [knn_segmentation(maps, folder.labels, folder.num_classes, mode=m)['miou'] for m in ('centroid', 'patch')]
        return (' | '.join(f'{100 * s:.2f}' for s in knn)
                + f' | {variance_share(maps):.3f} | {zero_input_cosine(maps, reference):.3f}')

    raw = torch.stack([it['feats'][0].float() for it in items]).permute(0, 3, 1, 2)
    print(f'{args.data}: {len(items)} images, {PRESETS["fast"].n_views} views each')
    print('| setting | kNN centroids | kNN patches | variance share | \\|cos\\| zero-input | cos(F+G, raw) | s/image |')
    print('|---|---|---|---|---|---|---|')
    print(f'| raw | {scores(raw)} | | |')
    rows = list(CANDIDATES.items())
    grid = PRESETS[args.grid].hash
    table_names = {'dense': 'dense Adam', 'sparse': 'HashTableAdam'}
    for name, overrides in [rows[i] for i in args.rows] if args.rows else rows:
        if args.grid != 'fast' or args.iterations:
            name += f', {args.grid} grid, {args.iterations or fast.iterations} steps'
        maps = {}  # (table optimizer, seed offset) -> F
        for table_adam, offset in itertools.product(args.table_adam, args.seed_offsets):
            settings = fast.with_overrides(**overrides, hash=grid, iterations=args.iterations,
                                           sparse_table_adam=table_adam == 'sparse')
            start, results = time.perf_counter(), []
            for i in tqdm(range(0, len(items), args.batch_images), desc='optimisation', leave=False):
                batch = items[i:i + args.batch_images]
                results.append(decompose(torch.stack([it['feats'].float() for it in batch]),
                                         torch.stack([it['coords'] for it in batch]),
                                         [(it['seed'] + offset) % 2 ** 63 for it in batch], settings, backend='torch'))
            seconds = (time.perf_counter() - start) / len(items)
            clean = torch.cat([r.denoised for r in results]).permute(0, 3, 1, 2)
            maps[table_adam, offset] = clean
            artifact = torch.cat([r.artifact for r in results]).permute(0, 3, 1, 2)
            cos = F.cosine_similarity(clean + artifact, raw, dim=1).mean().item()
            label = (name + (f', {table_names[table_adam]}' if len(args.table_adam) > 1 else '')
                     + (f', seeds +{offset}' if offset else ''))
            print(f'| {label} (F) | {scores(clean)} | {cos:.4f} | {seconds:.1f} |', flush=True)
            norms = [t.norm(dim=1).mean().item() for t in (raw, artifact, raw - clean - artifact)]
            print(f'| {label} (raw - G) | {scores(raw - artifact)} | | | norms: raw {norms[0]:.2f}, G {norms[1]:.2f}, '
                  f'raw - F - G {norms[2]:.2f}', flush=True)
            if offset == args.seed_offsets[0]:  # G barely moves between seeds: probe it once per row
                # Does the positional term carry class information on this set? raw with G counted twice, G alone,
                # and one G for every image (a pure layout prior).
                print(f'| {label} (raw + G) | {scores(raw + artifact)} | | |', flush=True)
                print(f'| {label} (G alone) | {scores(artifact)} | | |', flush=True)
                mean_g = artifact.mean(0).expand_as(artifact)
                print(f'| {label} (mean G, one map for every image) | {scores(mean_g)} | | |', flush=True)
        n = len(args.seed_offsets)
        if n > 1:  # does averaging away the seed-to-seed fit error lift F's kNN?
            for table_adam in args.table_adam:
                mean_f = sum(maps[table_adam, o] for o in args.seed_offsets) / n
                print(f'| {name}, {table_names[table_adam]}, F averaged over the {n} seeds | {scores(mean_f)} | | |',
                      flush=True)
        # How far apart do two optimizers, or two seeds, put F? (1 = the same map up to a per-channel offset)
        for a, b in itertools.combinations(maps, 2):
            agree = sum(centred_cos(x, y) for x, y in zip(maps[a].permute(0, 2, 3, 1), maps[b].permute(0, 2, 3, 1)))
            print(f'  agreement of F, {table_names[a[0]]} seeds +{a[1]} vs {table_names[b[0]]} seeds +{b[1]}: '
                  f'{agree / len(items):.4f}', flush=True)


if __name__ == '__main__':
    main()
