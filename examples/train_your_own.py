"""Train your own denoiser: from a folder of images to a Hub-ready DVT denoiser, for any timm ViT.

    python examples/train_your_own.py --images my_photos/ --model vit_small_patch14_dinov2 --out runs/mine

It runs the two stages in Python; the same recipe on the command line is

    dvt-timm denoise-images --model vit_small_patch14_dinov2 --images my_photos/ --out runs/mine/stage1 --preset fast
    dvt-timm train-denoiser --data runs/mine/stage1 --model vit_small_patch14_dinov2 --out runs/mine/denoiser \
        --batch-size 4 --val-frac 0.2     # this script's defaults; the CLI's batch of 64 needs ~70 images

and `dvt_timm.hub.upload_denoiser('runs/mine/denoiser', 'you/your-denoiser')` publishes it with its model
card (or pass --push-to-hub here). Stage 1 is resumable: rerun the same command after an interruption.
Weights: --backbone-checkpoint when given, else the DINOv2 ViT-S/14 in $DVT_SHARED/weights when it exists
and --model is that backbone, else timm's pretrained weights.
"""
import argparse
import os
from pathlib import Path
from typing import Optional

import torch

from dvt_timm import DenoisedViT
from dvt_timm.checkpoint import backbone_weights_id
from dvt_timm.data import image_to_tensor, list_images, load_image
from dvt_timm.fields import PRESETS
from dvt_timm.fields.folder import denoise_folder
from dvt_timm.fields.pipeline import resolve_settings
from dvt_timm.hub import upload_denoiser
from dvt_timm.training import TrainConfig, train

HERE = Path(__file__).resolve().parent


def shared_backbone(model: str) -> Optional[Path]:
    """The shared DINOv2 ViT-S/14 weights, when `model` is that backbone and this checkout has them."""
    if not model.startswith('vit_small_patch14_dinov2'):
        return None
    for root in (os.environ.get('DVT_SHARED'), HERE.parent.parent / 'shared'):
        if root and (Path(root) / 'weights' / 'dinov2_vits14.safetensors').is_file():
            return Path(root) / 'weights' / 'dinov2_vits14.safetensors'
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', default=str(HERE / 'assets'), help='image folder or list file')
    parser.add_argument('--model', default='vit_small_patch14_dinov2', help='any timm ViT id')
    parser.add_argument('--backbone-checkpoint', default=None)
    parser.add_argument('--out', default='runs/train_your_own')
    parser.add_argument('--preset', default='fast', choices=sorted(PRESETS), help='stage-1 preset')
    parser.add_argument('--views', type=int, default=None, help='stage-1 views per image (preset default)')
    parser.add_argument('--iterations', type=int, default=None, help='stage-1 iterations (preset default)')
    parser.add_argument('--image-size', type=int, default=None, help='stage-1 input side (preset default)')
    parser.add_argument('--epochs', type=int, default=100, help='stage-2 epochs')
    parser.add_argument('--batch-size', type=int, default=4,
                        help='stage-2 global batch, at most the training files '
                             '(the 5 bundled photos: 4 train, 1 held out)')
    parser.add_argument('--push-to-hub', default=None, metavar='REPO_ID', help='publish the denoiser there')
    args = parser.parse_args()

    checkpoint = args.backbone_checkpoint or shared_backbone(args.model)
    model = DenoisedViT(args.model, pretrained=checkpoint is None, backbone_checkpoint=checkpoint)
    out = Path(args.out)

    # Stage 1: per-image neural-field denoising, one <stem>.safetensors of (raw, F) per image.
    settings = resolve_settings(PRESETS[args.preset].with_overrides(
        n_views=args.views, iterations=args.iterations, image_size=args.image_size), model.patch_size)
    summary = denoise_folder(model, list_images(args.images), out / 'stage1', settings, model.backbone_name,
                             backbone_weights=backbone_weights_id(checkpoint))  # resumes check it
    print(f'stage 1: {summary}')

    # Stage 2: the generalizable denoiser, trained on the (raw, F) pairs.
    result = train(TrainConfig(data=str(out / 'stage1'), model=model.backbone_name, out=str(out / 'denoiser'),
                               epochs=args.epochs, batch_size=args.batch_size, val_frac=0.2, workers=0,
                               val_every=0, ckpt_every=0, resume=True))
    print(f'stage 2: {result["steps"]} steps, held-out loss {result["val_loss"]}')

    # The result is a denoiser in dvt-timm's format: load it like any other.
    trained = DenoisedViT.from_pretrained(out / 'denoiser', backbone_checkpoint=checkpoint).eval()
    image = list_images(args.images)[0]
    x = image_to_tensor(load_image(image), settings.image_size, *(trained.pretrained_cfg[k] for k in ('mean', 'std')))
    with torch.inference_mode():
        raw, clean = trained.raw_and_denoised(x[None])
    cos = torch.nn.functional.cosine_similarity(raw, clean, dim=1).mean()
    print(f'loaded {out / "denoiser"}: {image.name} features {tuple(clean.shape)}, mean cosine(raw, denoised) {cos:.3f}')
    if args.push_to_hub:
        print(f'pushed: {upload_denoiser(out / "denoiser", args.push_to_hub)}')


if __name__ == '__main__':
    main()
