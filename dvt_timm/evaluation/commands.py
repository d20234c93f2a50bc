"""`dvt-timm evaluate` and `dvt-timm visualize`: argparse registration and the command functions.

`dvt_timm.cli` wires them in with `add_evaluate_parser(sub)` / `add_visualize_parser(sub)`; errors are raised
as ValueError / FileNotFoundError for `main()` to print.
"""
import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoint import atomic_write, backbone_weights_id, same_backbone
from ..cli import output_folder, positive_float, positive_int
from ..data import image_size, list_images, load_image, unique_stems
from ..model import DenoisedViT
from ..registry import check_checkpoints, load_model
from .features import VARIANTS, FeatureSet, extract_features, load_stage1, zero_input_map
from .knn import knn_segmentation, query_split
from .labels import LABEL_FORMATS, LabeledFolder, image_key, find_label_pairs
from .linear_probe import linear_probe, probe_splits
from .lost import boxes_from_label, lost_discovery, read_boxes
from .metrics import artifact_metrics
from .scores import bootstrap_miou

__all__ = ['add_evaluate_parser', 'add_visualize_parser', 'run_evaluate', 'run_visualize',
           'format_table', 'format_intervals']

_logger = logging.getLogger(__name__)
PROTOCOLS = ('artifacts', 'knn', 'linear', 'lost')
BOOTSTRAP_LEVEL = 0.95
# What the table shows per protocol: (result key, label, scale to percent?)
_TABLE_ROWS = {
    'artifacts': [('variance_share', 'variance share of per-position mean', False),
                  ('zero_input_cosine', 'mean |cos| to zero-input map', False),
                  ('mic', 'positional MIC (approx., mean of x/y)', False),
                  ('mic_x', '  MIC with x', False), ('mic_y', '  MIC with y', False),
                  ('high_norm_fraction', 'high-norm token fraction', False),
                  ('norm_max_median', 'norm max / median', False)],
    'knn': [('miou', 'mIoU %', True), ('macc', 'mAcc %', True), ('pixel_acc', 'pixel acc %', True)],
    'linear': [('miou', 'mIoU %', True), ('macc', 'mAcc %', True), ('pixel_acc', 'pixel acc %', True)],
    'lost': [('corloc', 'CorLoc %', True)],
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model', help='dvt_* model name or timm backbone id, e.g. dvt_vit_small_patch14_dinov2 '
                                   '(not needed with --features)')
    p.add_argument('--backbone-checkpoint', help='timm-layout backbone weights (.safetensors / .pth)')
    p.add_argument('--denoiser-checkpoint', help="denoiser weights (authors' .pth or our directory)")
    p.add_argument('--no-pretrained', action='store_true',
                   help='no pretrained weights, downloaded or shipped: parts without a checkpoint stay randomly '
                        'initialised')
    p.add_argument('--size', type=positive_int, nargs='+', metavar='PX',
                   help='input size (one side, or H W), squash-resized; default 448 (a 32x32 grid at patch 14); '
                        'with --features, the size they were made at')
    p.add_argument('--batch-size', type=positive_int, default=1, help='images per backbone pass (default 1)')
    p.add_argument('--cache', metavar='DIR', type=output_folder,
                   help='on-disk feature cache, keyed by the weights and the input size')
    p.add_argument('--limit', type=positive_int, help='use only the first N images')
    p.add_argument('--device', help='where the backbone runs (default: cuda when available, else cpu)')


def _device(requested: Optional[str]) -> torch.device:
    try:
        device = torch.device(requested or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as e:
        raise ValueError(f'--device {requested}: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {requested} asks for CUDA, but torch sees no CUDA GPU')
    return device


def _load_model(args: argparse.Namespace, denoiser_checkpoint: Optional[str], need_denoiser: bool) -> DenoisedViT:
    return load_model(args.model, args.backbone_checkpoint, denoiser_checkpoint, not args.no_pretrained,
                      need_denoiser=need_denoiser).to(_device(args.device))


def _check_weights(fs: FeatureSet, args: argparse.Namespace) -> None:
    """Stored features whose files record the backbone's weights must come from the weights --model loads."""
    if fs.backbone_weights is None:
        return
    ours = backbone_weights_id(args.backbone_checkpoint, pretrained=not args.no_pretrained)
    if ours != fs.backbone_weights:
        raise ValueError(f'{args.features} holds features of {fs.model} with weights {fs.backbone_weights}, but '
                         f'--model loads {ours or "random weights (--no-pretrained)"}; give the --backbone-checkpoint '
                         'stage 1 used')


def torch_seed(text: str) -> int:
    """argparse type: a seed torch takes (0 to 2**63 - 1)."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f'must be in [0, 2**63 - 1], got {value}')
    return value


def bootstrap_resamples(text: str) -> int:
    """argparse type: bootstrap resamples, enough for the 2.5% tails of a 95% interval."""
    value = int(text)
    if value < 100:
        raise argparse.ArgumentTypeError(f'must be at least 100 for a 95% interval (e.g. 1000), got {value}')
    return value


def _area_share(text: str) -> float:
    """argparse type: a share of the image area, in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f'must be a share of the image in [0, 1], got {text}')
    return value


def _prepare_out(out: Path, suffix: str) -> None:
    """Create the folder of `--out` now, so that a path that cannot be written fails before the work."""
    if out.is_dir():
        raise ValueError(f'--out {out} is a folder; give a {suffix} file path')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, ...
        raise ValueError(f'--out {out}: cannot create its folder {out.parent} ({e.strerror or e})') from e
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f'--out {out}: its folder {out.parent} is not writable')


def _variants(arg: Sequence[str]) -> Tuple[str, ...]:
    out = tuple(dict.fromkeys(v for a in arg for v in a.split(',') if v))
    bad = [v for v in out if v not in VARIANTS]
    if bad or not out:
        raise ValueError(f'--variants must name some of {VARIANTS}, got {list(arg)}')
    return out


def _size(arg: Optional[Sequence[int]]) -> Tuple[int, int]:
    """--size as (H, W); 448 x 448 when not given."""
    if arg is None:
        return 448, 448
    if len(arg) not in (1, 2) or min(arg) <= 0:
        raise ValueError(f'--size takes one side or H W, got {list(arg)}')
    return (arg[0], arg[0]) if len(arg) == 1 else (arg[0], arg[1])


def _check_stored_size(fs: FeatureSet, args: argparse.Namespace) -> None:
    """Stored features are used at the size they were made at: a --size that differs is refused, not ignored."""
    if args.size is not None and _size(args.size) != tuple(fs.input_size):
        (H, W), (h, w) = fs.input_size, _size(args.size)
        raise ValueError(f'--features {args.features} holds features of {H}x{W} inputs, but --size asks for '
                         f'{h}x{w}: leave out --size, or run the model at that size without --features')


# --------------------------------------------------------------------------------------------- evaluate
def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `evaluate` on an argparse subparsers object."""
    p = subparsers.add_parser(
        'evaluate', help='artifact metrics and dense protocols on raw vs denoised features',
        description='Compare raw and denoised features: label-free artifact metrics, kNN segmentation, a linear '
                    'probe and LOST-style object discovery. Prints a table and writes JSON.')
    _add_model_args(p)
    p.add_argument('--data', help='image folder, or a labelled folder (images/ + labels/ or masks/, or '
                                  '<id>_image.png + <id>_target.png)')
    p.add_argument('--features', metavar='DIR', help='stored stage-1 outputs (<image stem>.safetensors) to evaluate '
                                                     'instead of running the model')
    p.add_argument('--protocol', nargs='+', choices=PROTOCOLS, required=True, help='what to measure, one or more')
    p.add_argument('--variants', nargs='+', default=['raw,denoised'], help='raw, denoised or both (default)')
    p.add_argument('--out', default='evaluation.json', help='JSON results file (default evaluation.json)')
    p.add_argument('--seed', type=torch_seed, default=0,
                   help='seed of splits, probe initialisation, batch order and weights without a checkpoint')
    p.add_argument('--bootstrap', type=bootstrap_resamples, metavar='RESAMPLES',
                   help='kNN and linear probe: 95%% intervals of mIoU and of its change from raw, resampling the '
                        'scored images this many times (e.g. 1000); paired, so the change is what the same '
                        'images would give')
    g = p.add_argument_group('labels')
    g.add_argument('--labels', metavar='DIR', help='label folder, when not next to the images')
    g.add_argument('--labels-format', choices=LABEL_FORMATS, help='label format (default: detected)')
    g.add_argument('--ignore-index', type=int,
                   help="label value for unlabelled pixels (default 255 for voc/index; e.g. 0 for COCO, 11 for CamVid)")
    g = p.add_argument_group('artifacts')
    g.add_argument('--norm-k', type=positive_float, default=5.0,
                   help='high-norm threshold: median + k * MAD (default 5)')
    g.add_argument('--mic-channels', type=positive_int, default=32,
                   help='MIC maximum over this many channels, screened by correlation ratio (the feature width or '
                        'more = all; default 32)')
    g.add_argument('--mic-images', type=positive_int, help='MIC on the first N images only')
    g = p.add_argument_group('knn')
    g.add_argument('--k', type=positive_int, default=20, help='neighbours (default 20)')
    g.add_argument('--temperature', type=positive_float, default=0.07, help='vote weight exp(cos / T) (default 0.07)')
    g.add_argument('--knn-mode', nargs='+', choices=('centroid', 'patch'), default=['centroid'],
                   help="bank of class centroids per image (the paper's) and/or of patches (default centroid)")
    g.add_argument('--knn-holdout', type=float,
                   help='fraction of images held out as queries (default: leave-one-image-out)')
    g = p.add_argument_group('linear probe')
    g.add_argument('--probe-holdout', type=float, default=0.25, help='held-out fraction (default 0.25)')
    g.add_argument('--probe-folds', type=int,
                   help='K-fold cross-validation instead of one held-out split: every image is tested once '
                        '(steadier on a set of a few dozen images)')
    g.add_argument('--probe-steps', type=positive_int, default=500, help='AdamW steps of 8 images (default 500)')
    g.add_argument('--lr', type=positive_float, default=3e-2, help='probe learning rate (default 0.03)')
    g = p.add_argument_group('lost')
    g.add_argument('--lost-seed', choices=('norm', 'degree'), default='norm',
                   help='seed patch: highest feature norm (default) or lowest degree (original LOST)')
    g.add_argument('--lost-expand', type=positive_int, default=100, help='seed-set size (default 100, as LOST)')
    g.add_argument('--boxes', metavar='JSON', help='ground-truth boxes {"<image stem>": [[x0, y0, x1, y1], ...]}')
    g.add_argument('--boxes-from-masks', action='store_true',
                   help='derive ground-truth boxes from connected regions of the label masks (approximate)')
    g.add_argument('--box-classes', metavar='SPEC',
                   help='label values that are objects for --boxes-from-masks, e.g. 1-90 (default: all but 0)')
    g.add_argument('--min-box-area', type=_area_share, default=0.01,
                   help='derived boxes cover at least this share of the image (default 0.01)')
    p.set_defaults(func=run_evaluate)
    return p


def _parse_values(spec: str) -> List[int]:
    values: List[int] = []
    try:
        for part in spec.split(','):
            lo, _, hi = part.strip().partition('-')
            if hi and int(hi) < int(lo):
                raise ValueError(f'the range {part.strip()} is empty')
            values.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError as e:
        raise ValueError(f'--box-classes expects values and ranges like 1-90,92, got {spec!r} ({e})') from e
    return values


def _fmt(value: Any, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 'n/a'
    return f'{100 * value:.2f}' if percent else f'{value:.4f}'


def format_table(results: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """A plain-text table: one row per metric, one column per variant (and the change when both)."""
    variants = [v for v in VARIANTS if any(v in r for r in results.values())]
    both = variants == list(VARIANTS)
    head = f'{"protocol":<16} {"metric":<40}' + ''.join(f' {v:>10}' for v in variants) + (' {:>10}'.format('change')
                                                                                            if both else '')
    lines = [head, '-' * len(head)]
    for key, per_variant in results.items():
        for metric, label, percent in _TABLE_ROWS[key.split('-')[0]]:
            vals = [per_variant.get(v, {}).get(metric) for v in variants]
            row = f'{key:<16} {label:<40}' + ''.join(f' {_fmt(v, percent):>10}' for v in vals)
            if both:
                ok = all(isinstance(v, (int, float)) and not math.isnan(v) for v in vals)
                row += f' {_fmt(vals[1] - vals[0], percent) if ok else "n/a":>10}'
            lines.append(row)
    return '\n'.join(lines)


def format_intervals(results: Dict[str, Dict[str, Dict[str, Any]]], resamples: int) -> str:
    """The bootstrap intervals of mIoU (%) per protocol and variant, and of the change from raw."""
    lines = []
    for key, per_variant in results.items():
        parts = [f'{v} [{100 * r["miou_ci"][0]:.2f}, {100 * r["miou_ci"][1]:.2f}]'
                 for v, r in per_variant.items() if 'miou_ci' in r]
        parts += [f'change [{100 * r["change_ci"][0]:+.2f}, {100 * r["change_ci"][1]:+.2f}], >= 0 in '
                  f'{100 * r["change_nonnegative"]:.0f}% of resamples'
                  for r in per_variant.values() if 'change_ci' in r]
        if parts:
            lines.append(f'{key:<16} ' + '   '.join(parts) + f'   ({resamples} resamples)')
    head = f'mIoU % {100 * BOOTSTRAP_LEVEL:.0f}% intervals, images resampled (paired):'
    return '\n'.join([head] + lines) if lines else ''


def run_evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """The `evaluate` command; returns what it writes to `--out`."""
    protocols = list(dict.fromkeys(args.protocol))
    variants = _variants(args.variants)
    size = _size(args.size)
    if args.data is None and (args.features is None or set(protocols) - {'artifacts'}):
        raise ValueError('--data is required (only --features with --protocol artifacts runs without it)')
    if args.features is None and args.model is None:
        raise ValueError('give --model (or --features with stored stage-1 outputs)')
    if 'lost' in protocols and args.boxes and args.boxes_from_masks:
        raise ValueError('give either --boxes or --boxes-from-masks, not both')
    _device(args.device)  # a bad --device fails before anything is created or read
    _prepare_out(Path(args.out), '.json')
    needs_labels = bool({'knn', 'linear'} & set(protocols)) or ('lost' in protocols and args.boxes_from_masks)
    # Box inputs are parsed now so that a bad file or value fails before the backbone pass.
    box_table = read_boxes(args.boxes) if 'lost' in protocols and args.boxes else None
    box_values = set(_parse_values(args.box_classes)) if 'lost' in protocols and args.box_classes else None
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)  # weights without a checkpoint (a test denoiser) initialise the same every run
    check_checkpoints(args.backbone_checkpoint, args.denoiser_checkpoint)  # fail before reading any data

    # --- images and labels
    labeled: Optional[LabeledFolder] = None
    images: Optional[List[Path]] = None
    names: Optional[List[str]] = None
    class_names: Optional[List[str]] = None
    if args.data is not None:
        if needs_labels:
            labeled = LabeledFolder(args.data, args.labels_format, args.ignore_index, args.labels, args.limit)
            images, names, class_names = labeled.images, labeled.names, labeled.class_names()
        else:
            pairs = find_label_pairs(args.data, args.labels)
            images = [img for img, _ in pairs] if pairs else list_images(args.data)
            images = images[:args.limit] if args.limit else images
            if not images:
                raise ValueError(f'{args.data}: no images found')
            names = [image_key(p, Path(args.data)) for p in images]
    # Boxes that match no image, box classes that match no label value: named before the backbone pass.
    if box_table is not None and names is not None and not any(n in box_table or Path(n).name in box_table
                                                                for n in names):
        raise ValueError(f'{args.boxes}: no boxes for any of the {len(names)} images (keys are image stems, such '
                         f'as {Path(names[0]).name!r}; the file has {sorted(box_table)[:3]})')
    if box_values and args.boxes_from_masks and labeled is not None and \
            not box_class_ids(labeled.class_values, box_values):
        raise ValueError(f'--box-classes {args.box_classes}: none of these values occurs in the labels (they hold '
                         f'{labeled.class_values})')
    # A bad split (hold-out fraction, fold count) fails before the backbone pass, not after it.
    if 'knn' in protocols:
        query_split(len(images), args.knn_holdout, args.seed)
    if 'linear' in protocols:
        probe_splits(len(images), args.probe_holdout, args.probe_folds, args.seed)

    # --- features (one backbone pass for every variant and protocol)
    t0 = time.perf_counter()
    if args.features is not None:
        fs = load_stage1(args.features, names=names, images=images)
        _check_stored_size(fs, args)
        if args.limit and names is None:
            fs = fs.select(fs.names[:args.limit])
        if args.model is not None:  # only for the zero-input reference of the artifact metrics
            _check_weights(fs, args)  # before a download of weights that would not fit
            model = _load_model(args, None, need_denoiser=False)
            if not same_backbone(fs.model, model.backbone_name):
                raise ValueError(f'{args.features} holds features of {fs.model}, but --model is {model.backbone_name}')
            fs.reference = zero_input_map(model, fs.input_size)
        missing = [v for v in variants if v not in fs.maps]
        if missing:
            raise ValueError(f'{args.features}: the stored features have no {missing} maps')
        fs.maps = {v: fs.maps[v] for v in variants}
        if images is not None:
            by_name, sizes = dict(zip(names, images)), {}
            for n in fs.names:
                try:
                    sizes[n] = image_size(by_name[n])
                except ValueError as e:  # its stored features are left out, as extraction would leave it out
                    _logger.warning('skipping %s', e)
            if len(sizes) < len(fs.names):
                fs = fs.select([n for n in fs.names if n in sizes])
            fs.image_sizes = [sizes[n] for n in fs.names]
    else:
        model = _load_model(args, args.denoiser_checkpoint, need_denoiser='denoised' in variants)
        fs = extract_features(model, images, size, variants, names=names, batch_size=args.batch_size,
                              cache_dir=args.cache, progress=True)
    t_features = time.perf_counter() - t0

    labels = None
    if labeled is not None:
        labels = labeled.labels_for(fs.names)

    # --- protocols
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    timing: Dict[str, float] = {'features_s': t_features}
    failed: Dict[str, str] = {}  # protocol -> why; the others' results are still written
    for protocol in protocols:
        t0 = time.perf_counter()
        try:
            if protocol == 'artifacts':
                results['artifacts'] = {v: artifact_metrics(
                    fs.maps[v], fs.reference, norm_k=args.norm_k, mic_images=args.mic_images,
                    mic_channels=args.mic_channels, progress=True) for v in variants}
                if fs.reference is None:
                    _logger.warning('no zero-input reference (stored features without --model): |cos| not computed')
            elif protocol == 'knn':
                for mode in args.knn_mode:
                    results[f'knn-{mode}'] = {v: knn_segmentation(
                        fs.maps[v], labels, labeled.num_classes, k=args.k, temperature=args.temperature, mode=mode,
                        holdout=args.knn_holdout, seed=args.seed, class_names=class_names, progress=True,
                        per_image=bool(args.bootstrap))
                        for v in variants}
            elif protocol == 'linear':
                results['linear'] = {v: linear_probe(
                    fs.maps[v], labels, labeled.num_classes, holdout=args.probe_holdout, seed=args.seed,
                    folds=args.probe_folds, steps=args.probe_steps, lr=args.lr, class_names=class_names,
                    progress=True, per_image=bool(args.bootstrap)) for v in variants}
            elif protocol == 'lost':
                results['lost'] = _run_lost(args, fs, labeled, labels, box_table, box_values)
        except ValueError as e:  # e.g. fewer images than it needs, once unreadable ones were left out
            failed[protocol] = str(e)
            _logger.error('%s could not be scored: %s', protocol, e)
        timing[f'{protocol}_s'] = time.perf_counter() - t0
    for per_variant in results.values():  # kept only for the bootstrap, not written out
        matrices = {v: r.pop('image_matrices') for v, r in per_variant.items() if 'image_matrices' in r}
        if matrices:
            baseline = 'raw' if len(matrices) > 1 else None
            for v, ci in bootstrap_miou(matrices, baseline, args.bootstrap, BOOTSTRAP_LEVEL, args.seed).items():
                per_variant[v].update(ci)
    timing['total_s'] = time.perf_counter() - t_start

    report = {
        'command': 'evaluate',
        'config': {k: v for k, v in vars(args).items() if k != 'func'},
        'model': fs.model, 'input_size': list(fs.input_size), 'grid': list(fs.grid), 'images': len(fs.names),
        'classes': (dict(zip(class_names, labeled.class_values)) if labeled is not None else None),
        'skipped_labels': labeled.skipped if labeled is not None else {},
        'timing': timing, 'results': results, 'failed': failed,
    }
    print(f'{len(fs.names)} images, {fs.grid[0]}x{fs.grid[1]} patches at {fs.input_size[0]}x{fs.input_size[1]}'
          + (f', {labeled.num_classes} classes' if labeled is not None else '')
          + f' | features {t_features:.1f} s, total {timing["total_s"]:.1f} s')
    print(format_table(results))
    intervals = format_intervals(results, args.bootstrap) if args.bootstrap else ''
    if intervals:  # empty when no protocol scored mIoU
        print(intervals)
    text = json.dumps(_finite_or_null(report), indent=2, default=_json_default, allow_nan=False)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f'wrote {args.out}')
    if failed:
        raise ValueError(f'{", ".join(failed)} could not be scored ({"; ".join(failed.values())}); the other results '
                         f'are in {args.out}')
    return report


def _finite_or_null(o: Any) -> Any:
    """NaN and Inf (e.g. CorLoc with no boxes) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_or_null(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f'{type(o).__name__} is not JSON serialisable')


def box_class_ids(class_values: Sequence[int], box_values: Optional[set]) -> List[int]:
    """Contiguous class ids of the label values that are objects: `box_values` (`--box-classes`), else every
    value but 0 (with `--ignore-index 0` on COCO, value 1, person, is id 0 and stays an object)."""
    return [i for i, v in enumerate(class_values) if (v in box_values if box_values else v != 0)]


def _run_lost(args: argparse.Namespace, fs: FeatureSet, labeled: Optional[LabeledFolder],
              labels: Optional[List[torch.Tensor]], box_table: Optional[Dict[str, List]],
              box_values: Optional[set]) -> Dict[str, Dict[str, Any]]:
    gt = None
    sizes = fs.image_sizes
    if args.boxes_from_masks:
        classes = box_class_ids(labeled.class_values, box_values)
        gt = [boxes_from_label(lab, classes, args.min_box_area) for lab in labels]
        sizes = [(lab.shape[1], lab.shape[0]) for lab in labels]  # boxes live in the label's pixel frame
    elif box_table is not None:
        gt = [box_table.get(n, box_table.get(Path(n).name, [])) for n in fs.names]
        if not any(gt):
            raise ValueError(f'{args.boxes}: no boxes for any of the {len(fs.names)} images (keys are image stems)')
    if any(s is None for s in sizes):
        raise ValueError('LOST needs the original image sizes: pass --data with the images')
    out = {}
    for v in fs.maps:
        out[v] = lost_discovery(fs.maps[v], sizes, gt, seed=args.lost_seed, expand=args.lost_expand, progress=True)
        out[v]['gt_boxes'] = ('derived from masks' if args.boxes_from_masks else args.boxes) if gt else None
    return out


# -------------------------------------------------------------------------------------------- visualize
def add_visualize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `visualize` on an argparse subparsers object."""
    p = subparsers.add_parser(
        'visualize', help='PNG of PCA / K-means / norm / cosine panels, raw vs denoised',
        description='Write a PNG with one row per image: the input, then PCA to RGB (fitted jointly on raw and '
                    'denoised features), K-means clusters, the feature norm and the cosine similarity to one '
                    'patch, each before and after denoising.')
    _add_model_args(p)
    p.add_argument('images', nargs='+',
                   help='image files, folders, or text files listing images (paths relative to the list\'s folder)')
    p.add_argument('--features', metavar='DIR', help='stored stage-1 outputs to show instead of running the model')
    p.add_argument('--out', default='dvt_features.png', help='output PNG (default dvt_features.png)')
    p.add_argument('--raw-only', action='store_true', help='show raw features only (no denoiser needed)')
    p.add_argument('--clusters', type=positive_int, default=6, help='K-means clusters (default 6)')
    p.add_argument('--patch', default='0.5,0.5', help='reference patch for the cosine panels as fractional '
                                                      'ROW,COL in [0, 1] (default the centre)')
    p.add_argument('--panel-size', type=positive_int, default=192, help='panel width in pixels (default 192)')
    p.add_argument('--seed', type=torch_seed, default=0, help='seed of K-means and of weights without a checkpoint')
    p.set_defaults(func=run_visualize)
    return p


def _collect_images(sources: Sequence[str]) -> List[Path]:
    paths: List[Path] = []
    for s in sources:
        path = Path(s)
        try:  # a folder, an image file, or a text file listing images, as for the other commands
            paths.extend(list_images(path))
        except ValueError:  # a file that is not text: an image in a format list_images does not name (e.g. .gif)
            paths.append(path)
        except FileNotFoundError:
            raise FileNotFoundError(f'no image, folder or list at {path}') from None
    if not paths:
        raise ValueError(f'no images in {list(sources)}')
    return paths


def run_visualize(args: argparse.Namespace) -> Path:
    """The `visualize` command; returns the PNG path."""
    from ..visualize import feature_figure

    try:
        patch = tuple(float(v) for v in args.patch.split(','))
    except ValueError:
        patch = ()
    if len(patch) != 2 or not all(0 <= v <= 1 for v in patch):  # checked now, not after the backbone pass
        raise ValueError(f'--patch takes ROW,COL fractions in [0, 1] like 0.5,0.5, got {args.patch!r}')
    if args.features is None and args.model is None:
        raise ValueError('give --model (or --features with stored stage-1 outputs)')
    out = Path(args.out)
    if out.suffix.lower() != '.png':
        raise ValueError(f'--out must be a .png file, got {out}')
    _device(args.device)  # a bad --device fails before anything is created or read
    _prepare_out(out, '.png')
    check_checkpoints(args.backbone_checkpoint, args.denoiser_checkpoint)
    paths = [p for p in _collect_images(args.images) if p.resolve() != out.resolve()][:args.limit]  # not our PNG
    torch.manual_seed(args.seed)  # weights without a checkpoint initialise the same every run
    variants = ('raw',) if args.raw_only else VARIANTS
    names = unique_stems(paths)
    if args.features is not None:
        fs = load_stage1(args.features, names=names, images=paths)
        _check_stored_size(fs, args)
    else:
        model = _load_model(args, args.denoiser_checkpoint, need_denoiser=not args.raw_only)
        fs = extract_features(model, paths, _size(args.size), variants, names=names, batch_size=args.batch_size,
                              cache_dir=args.cache, progress=True)
    by_name, images = dict(zip(names, paths)), {}
    for n in fs.names:
        try:
            images[n] = load_image(by_name[n])
        except ValueError as e:  # as evaluate does: its row is left out, not the figure
            _logger.warning('skipping %s', e)
    if not images:
        raise ValueError('none of the images could be read')
    fs = fs.select(list(images))
    images = list(images.values())
    fig = feature_figure(images, fs.maps['raw'], None if args.raw_only else fs.maps.get('denoised'),
                         clusters=args.clusters, patch=patch, panel_size=args.panel_size, seed=args.seed,
                         names=fs.names)
    atomic_write(out, lambda tmp: fig.save(tmp, format='PNG'))
    print(f'wrote {out} ({len(images)} row{"s" if len(images) != 1 else ""}, {fig.size[0]}x{fig.size[1]} px)')
    return out
