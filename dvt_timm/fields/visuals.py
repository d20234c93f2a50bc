"""A PNG row per stage-1 result: the image, PCA of raw, PCA of F, G, and the norm of Δ."""
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..checkpoint import atomic_write
from ..visualize import colormap, pca_rgb, rgb_panel
from .decomposition import Decomposition

__all__ = ['stage1_figure', 'save_stage1_visuals']

# ASCII titles: PIL's default font has no Greek letters.
_TITLES = ('image', 'raw (PCA)', 'F: denoised (PCA)', 'G: artifact (PCA)', 'delta: residual norm')


def stage1_figure(image: Image.Image, result: Decomposition, panel: int = 224) -> Image.Image:
    """One row: raw and F share one PCA (so their colours compare), G gets its own, |Δ| a colormap.

    |Δ| is scaled to its maximum but never to less than a tenth of the median raw norm: the sparsity term
    often leaves Δ a tiny constant, which stretched to its own maximum would paint the panel bright."""
    raw, clean, art = (t.permute(2, 0, 1).float() for t in (result.raw, result.denoised, result.artifact))
    raw_rgb, clean_rgb = pca_rgb([raw, clean])
    (art_rgb,) = pca_rgb([art])
    norm = result.residual.float().norm(dim=-1)
    scale = torch.maximum(norm.max(), 0.1 * result.raw.float().norm(dim=-1).median()).clamp_min(1e-12)
    panels = [image.convert('RGB').resize((panel, panel), Image.BICUBIC)]
    panels += [rgb_panel(t, (panel, panel)) for t in (raw_rgb, clean_rgb, art_rgb)]
    panels.append(rgb_panel(colormap(norm / scale), (panel, panel)))
    header, pad = 16, 4
    fig = Image.new('RGB', (len(panels) * (panel + pad) + pad, header + panel + 2 * pad), (255, 255, 255))
    draw, font = ImageDraw.Draw(fig), ImageFont.load_default()
    for j, (p, title) in enumerate(zip(panels, _TITLES)):
        x = pad + j * (panel + pad)
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        fig.paste(p, (x, header + pad))
    return fig


def save_stage1_visuals(image: Image.Image, png_path: Path, result: Decomposition) -> None:
    """Write `stage1_figure` for one image to `png_path`, atomically."""
    fig = stage1_figure(image, result)
    atomic_write(png_path, lambda tmp: fig.save(tmp, format='PNG'))
