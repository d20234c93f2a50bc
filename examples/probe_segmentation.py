"""Dense probing on a labelled folder: kNN segmentation and a linear probe on raw vs denoised features.

    python examples/probe_segmentation.py                                  # the 14 VOC samples in ../shared
    python examples/probe_segmentation.py --data ../shared/data/camvid_val --ignore-index 11

Features are computed once (one backbone pass gives raw and denoised maps) and shared by both protocols.
Weights are found as in quickstart.py. The same runs are available as `dvt-timm evaluate --protocol knn linear`.
"""
import argparse
import os
from pathlib import Path

from dvt_timm.checkpoint import backbone_arch
from dvt_timm.evaluation import LabeledFolder, extract_features, knn_segmentation, linear_probe
from dvt_timm.evaluation.commands import format_table
from dvt_timm.registry import load_model, resolve_backbone

HERE = Path(__file__).resolve().parent


def shared(*parts: str) -> Path:
    root = os.environ.get('DVT_SHARED') or HERE.parent.parent / 'shared'
    return Path(root, *parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default=str(shared('data', 'voc_val_samples')))
    parser.add_argument('--labels-format', choices=('voc', 'index', 'binary'))
    parser.add_argument('--ignore-index', type=int)
    parser.add_argument('--model', default='dvt_vit_small_patch14_dinov2.dvt_timm_photos')
    parser.add_argument('--backbone-checkpoint', default=None)
    parser.add_argument('--denoiser-checkpoint', default=None)
    parser.add_argument('--size', type=int, default=448)
    parser.add_argument('--limit', type=int, help='first N images only')
    parser.add_argument('--k', type=int, default=20)
    parser.add_argument('--probe-steps', type=int, default=500)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        parser.error(f'no data folder at {args.data}: pass --data, or set DVT_SHARED to the shared data folder')

    backbone = args.backbone_checkpoint
    on_shared = backbone_arch(resolve_backbone(args.model)) == 'vit_small_patch14_dinov2'
    if backbone is None and on_shared and shared('weights', 'dinov2_vits14.safetensors').is_file():
        backbone = str(shared('weights', 'dinov2_vits14.safetensors'))
    model = load_model(args.model, backbone, args.denoiser_checkpoint)  # the backbone from timm when None

    data = LabeledFolder(args.data, args.labels_format, args.ignore_index, limit=args.limit)
    print(f'{args.data}: {len(data)} images, {data.num_classes} classes ({data.labels_format} labels)')
    feats = extract_features(model, data.images, args.size, names=data.names)
    names = data.class_names()
    labels = data.labels_for(feats.names)  # an image that could not be read has no features
    results = {
        'knn-centroid': {v: knn_segmentation(feats.maps[v], labels, data.num_classes, k=args.k,
                                             seed=args.seed, class_names=names) for v in feats.variants},
        'linear': {v: linear_probe(feats.maps[v], labels, data.num_classes, seed=args.seed,
                                   steps=args.probe_steps, class_names=names) for v in feats.variants},
    }
    print(format_table(results))
    held = results['linear']['raw']
    print(f"kNN: leave-one-image-out, k={args.k}; linear probe: {held['train_images']} training / "
          f"{held['test_images']} held-out images")


if __name__ == '__main__':
    main()
