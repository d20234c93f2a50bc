"""Pictures of dense features, before and after denoising (DVT's Fig. 2 / S4 style), in torch and PIL.

One row per image: the input, then for each panel kind a raw and a denoised picture: PCA to RGB (fitted
jointly on raw and denoised features of all images, so colours compare), K-means clusters, the feature
norm, and the cosine similarity to one chosen patch.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = ['pca_fit', 'pca_rgb', 'kmeans', 'colormap', 'cluster_colors', 'rgb_panel', 'feature_figure']

# Anchor colours, interpolated linearly: viridis for magnitudes, a blue-white-red map for signed values.
_CMAPS = {
    'viridis': [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    'coolwarm': [(59, 76, 192), (141, 176, 254), (221, 221, 221), (244, 154, 123), (180, 4, 38)],
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 255, 255), (0, 0, 0)]


def colormap(values: torch.Tensor, name: str = 'viridis') -> np.ndarray:
    """Map values in [0, 1] (h, w) to RGB uint8 (h, w, 3) with a small built-in colormap."""
    if name not in _CMAPS:
        raise ValueError(f'unknown colormap {name!r}; expected one of {sorted(_CMAPS)}')
    anchors = torch.tensor(_CMAPS[name], dtype=torch.float32)
    pos = values.float().clamp(0, 1).nan_to_num(0) * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    t = (pos - lo)[..., None]
    rgb = anchors[lo] * (1 - t) + anchors[lo + 1] * t
    return rgb.round().to(torch.uint8).numpy()


def cluster_colors(labels: torch.Tensor) -> np.ndarray:
    """Cluster ids (h, w) to RGB uint8 (h, w, 3) from a fixed qualitative palette."""
    palette = torch.tensor(_PALETTE, dtype=torch.uint8)
    return palette[labels.long() % len(palette)].numpy()


def pca_fit(tokens: torch.Tensor, n: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), components (n, C)) of tokens (M, C), from an exact eigendecomposition; each component's
    sign is fixed so that its largest loading is positive (deterministic colours)."""
    tokens = tokens.double()
    mean = tokens.mean(0)
    x = tokens - mean
    _, vecs = torch.linalg.eigh(x.T @ x / max(1, len(x) - 1))
    comps = vecs[:, -n:].flip(1).T  # largest eigenvalues first
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    return mean.float(), (comps * signs).float()


def pca_rgb(maps: Sequence[torch.Tensor], n: int = 3) -> List[torch.Tensor]:
    """Project maps [(C, h, w)] on the first 3 principal components of all their tokens together and scale
    each component to [0, 1] by its 1st-99th percentile over all maps: [(3, h, w)]."""
    tokens = torch.cat([m.flatten(1).T for m in maps])
    mean, comps = pca_fit(tokens, n)
    proj = [(comps @ (m.flatten(1) - mean[:, None])).view(n, *m.shape[1:]) for m in maps]
    flat = torch.cat([p.flatten(1) for p in proj], 1)
    lo, hi = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
    return [((p - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]).clamp(0, 1) for p in proj]


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """K-means on the unit-normalised rows of x (n, C), k-means++ seeding from `seed`: labels (n,), with
    cluster 0 the largest, 1 the next, ... so that colours are stable."""
    x = F.normalize(x.float(), dim=1)
    k = min(k, len(x))
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(x, centres).min(1).values.pow(2)
        centres = torch.cat([centres, x[torch.multinomial(d + 1e-12, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    labels = torch.cdist(x, centres).argmin(1)
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.bincount(labels, minlength=k).argsort(descending=True, stable=True)] = torch.arange(k)
    return rank[labels]


def rgb_panel(rgb: Union[np.ndarray, torch.Tensor], size: Tuple[int, int]) -> Image.Image:
    """An (h, w, 3) uint8 array or a (3, h, w) tensor in [0, 1] as a panel of `size` (w, h), upsampled by
    nearest neighbour so that patches stay visible."""
    if isinstance(rgb, torch.Tensor):
        rgb = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)


def _panels_for(feat: torch.Tensor, rgb: torch.Tensor, patch: Tuple[int, int], clusters: int, seed: int,
                size: Tuple[int, int]) -> Dict[str, Image.Image]:
    C, h, w = feat.shape
    tokens = feat.flatten(1).T
    r, c = patch
    cos = F.cosine_similarity(tokens, tokens[r * w + c][None], dim=1).view(h, w)
    out = {
        'PCA': rgb_panel(rgb, size),
        'K-means': rgb_panel(cluster_colors(kmeans(tokens, clusters, seed=seed).view(h, w)), size),
        'norm': rgb_panel(colormap(_normalise(tokens.norm(dim=1).view(h, w))), size),
        'cosine': rgb_panel(colormap((cos + 1) / 2, 'coolwarm'), size),
    }
    # Mark the reference patch on the cosine panel.
    sx, sy = size[0] / w, size[1] / h
    ImageDraw.Draw(out['cosine']).rectangle(
        [c * sx - 1, r * sy - 1, (c + 1) * sx, (r + 1) * sy], outline=(0, 0, 0), width=2)
    return out


def feature_figure(
        images: Sequence[Image.Image],
        raw: torch.Tensor,
        denoised: Optional[torch.Tensor] = None,
        clusters: int = 6,
        patch: Tuple[float, float] = (0.5, 0.5),
        panel_size: int = 192,
        seed: int = 0,
        names: Optional[Sequence[str]] = None,
) -> Image.Image:
    """The figure: one row per image with the input and, per kind (PCA, K-means, norm, cosine to the patch
    at fractional position `patch` = (row, col)), the raw and (when given) the denoised panel.

    `raw` / `denoised` are (N, C, h, w) maps of the images in order. The PCA is fitted on all raw and
    denoised maps together; the norm panels are scaled per panel (their ranges differ); the cosine panels
    share the fixed range [-1, 1]; K-means is fitted per panel (colours ordered by cluster size).
    """
    if raw.ndim != 4 or raw.shape[0] != len(images):
        raise ValueError(f'raw maps {tuple(raw.shape)} do not match {len(images)} images')
    if denoised is not None and denoised.shape != raw.shape:
        raise ValueError(f'denoised maps {tuple(denoised.shape)} differ from raw {tuple(raw.shape)}')
    if not all(0 <= p <= 1 for p in patch):
        raise ValueError(f'patch must be a fractional (row, col) position in [0, 1], got {patch}')
    N, C, h, w = raw.shape
    cell = (min(int(patch[0] * h), h - 1), min(int(patch[1] * w), w - 1))
    variants = {'raw': raw.float()} if denoised is None else {'raw': raw.float(), 'denoised': denoised.float()}
    maps = [m for v in variants.values() for m in v]
    rgbs = pca_rgb(maps)
    size = (panel_size, panel_size * h // w)
    kinds = ('PCA', 'K-means', 'norm', 'cosine')
    titles = ['input'] + [f'{kind} {v}' for kind in kinds for v in variants]
    header, pad = 16, 4
    fig = Image.new('RGB', (len(titles) * (size[0] + pad) + pad, header + N * (size[1] + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    for j, title in enumerate(titles):
        draw.text((pad + j * (size[0] + pad) + 2, 2), title, fill=(0, 0, 0), font=font)
    for i, img in enumerate(images):
        y = header + pad + i * (size[1] + pad)
        fig.paste(img.convert('RGB').resize(size, Image.BICUBIC), (pad, y))
        if names is not None:
            draw.text((pad + 3, y + 3), str(names[i]), fill=(255, 255, 255), font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0))
        panels = {v: _panels_for(variants[v][i], rgbs[k * N + i], cell, clusters, seed, size)
                  for k, v in enumerate(variants)}
        col = 1
        for kind in kinds:
            for v in variants:
                fig.paste(panels[v][kind], (pad + col * (size[0] + pad), y))
                col += 1
    return fig
