"""Quickstart: load a DVT model, denoise, toggle the denoiser, and save a PCA picture of raw vs denoised features.

    python examples/quickstart.py                                   # examples/assets/chelsea.png at 448 px
    python examples/quickstart.py --image my.jpg --out my_pca.png

The default model is dvt-timm's own ViT-S/14 denoiser, which ships with the package. Backbone weights:
--backbone-checkpoint when given; else, for models on DINOv2 ViT-S/14, the one in $DVT_SHARED/weights (or
../shared/weights next to the repository); else timm's pretrained weights from the Hugging Face Hub. Other
--model tags fetch their denoiser from the Hub unless --denoiser-checkpoint is given.
"""
import argparse
import os
from pathlib import Path
from typing import Optional

import timm
import torch
from PIL import Image

import dvt_timm  # noqa: F401  (registers the dvt_* models with timm)
from dvt_timm.checkpoint import backbone_arch
from dvt_timm.data import image_to_tensor, load_image
from dvt_timm.registry import resolve_backbone
from dvt_timm.visualize import pca_rgb, rgb_panel

HERE = Path(__file__).resolve().parent


def shared_backbone(model: str) -> Optional[Path]:
    """The shared DINOv2 ViT-S/14 weights, when `model` is built on that backbone and this checkout has them."""
    if backbone_arch(resolve_backbone(model)) != 'vit_small_patch14_dinov2':
        return None
    for root in (os.environ.get('DVT_SHARED'), HERE.parent.parent / 'shared'):
        if root and (Path(root) / 'weights' / 'dinov2_vits14.safetensors').is_file():
            return Path(root) / 'weights' / 'dinov2_vits14.safetensors'
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--image', default=str(HERE / 'assets' / 'chelsea.png'))
    parser.add_argument('--model', default='dvt_vit_small_patch14_dinov2.dvt_timm_photos')
    parser.add_argument('--backbone-checkpoint', default=None)
    parser.add_argument('--denoiser-checkpoint', default=None)
    parser.add_argument('--size', type=int, default=448, help='input side, a multiple of the patch size')
    parser.add_argument('--out', default='quickstart_pca.png')
    args = parser.parse_args()

    backbone = args.backbone_checkpoint or shared_backbone(args.model)  # None: timm downloads the backbone
    model = timm.create_model(args.model, pretrained=True, backbone_checkpoint=backbone,
                              denoiser_checkpoint=args.denoiser_checkpoint).eval()

    cfg = timm.data.resolve_model_data_config(model)
    image = load_image(args.image)
    x = image_to_tensor(image, args.size, cfg['mean'], cfg['std'])[None]

    with torch.inference_mode():
        clean = model.feature_map(x)                      # denoised (the default)
        raw = model.denoise(False).feature_map(x)         # toggled off: the plain backbone
        model.denoise(True)
        raw2, clean2 = model.raw_and_denoised(x)          # both from one backbone pass
    assert torch.allclose(raw, raw2, atol=1e-5) and torch.allclose(clean, clean2, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(raw, clean, dim=1).mean()
    print(f'{model.backbone_name}: feature maps {tuple(clean.shape)} (B, C, h, w); '
          f'mean cosine(raw, denoised) = {cos:.3f}')

    # PCA fitted on raw and denoised tokens together, so that the two pictures share colours.
    rgb_raw, rgb_clean = pca_rgb([raw[0], clean[0]])
    side = 336
    panels = [image.resize((side, side), Image.BICUBIC)] + [rgb_panel(r, (side, side)) for r in (rgb_raw, rgb_clean)]
    canvas = Image.new('RGB', (3 * side, side))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * side, 0))
    canvas.save(args.out)
    print(f'wrote {args.out}: input | PCA raw | PCA denoised')


if __name__ == '__main__':
    main()
