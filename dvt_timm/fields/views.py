"""Views of one image and the image coordinates of their patch grids (DVT stage 1).

Each view is a RandomResizedCrop of the squashed S x S image (area scale (0.1, 0.5), aspect (3/4, 4/3)),
resized back to S x S with bicubic filtering and flipped horizontally with p = 0.5; the full image is
one more view. The K x K patch grid of a crop (top i, left j, height h, width w) maps to
`linspace(i/S, (i+h)/S, K) x linspace(j/S, (j+w)/S, K)` in image coordinates; a flip mirrors x.
"""
import math
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ['View', 'sample_views', 'view_coords', 'render_views']


@dataclass(frozen=True)
class View:
    """A crop (in pixels of the S x S image) and whether it is mirrored."""
    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    @classmethod
    def full(cls, size: int) -> 'View':
        return cls(0, 0, size, size, False)


def _random_resized_crop(
        size: int,
        generator: torch.Generator,
        scale: Tuple[float, float],
        ratio: Tuple[float, float],
) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameter sampling, drawn from `generator`."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, size, size  # torchvision's fallback for a square image: the whole image


def sample_views(
        n_views: int,
        size: int,
        generator: torch.Generator,
        scale: Tuple[float, float] = (0.1, 0.5),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
) -> List[View]:
    """The full view followed by `n_views` random resized crops of an S x S image."""
    views = [View.full(size)]
    for _ in range(n_views):
        top, left, h, w = _random_resized_crop(size, generator, scale, ratio)
        flip = bool(torch.rand(1, generator=generator).item() < flip_prob)
        views.append(View(top, left, h, w, flip))
    return views


def view_coords(views: List[View], size: int, grid: int) -> torch.Tensor:
    """Image coordinates (x, y) in [0, 1] of each view's K x K patch grid: (V, K, K, 2)."""
    t = torch.linspace(0, 1, grid, dtype=torch.float64)
    out = torch.empty(len(views), grid, grid, 2, dtype=torch.float64)
    for k, v in enumerate(views):
        ys = (v.top + v.height * t) / size
        xs = (v.left + v.width * t) / size
        if v.flip:
            xs = xs.flip(0)
        out[k, ..., 0] = xs.view(1, grid)
        out[k, ..., 1] = ys.view(grid, 1)
    return out.float()


def render_views(image: torch.Tensor, views: List[View]) -> torch.Tensor:
    """Crop, resize back to S x S (bicubic, antialiased) and flip: (3, S, S) -> (V, 3, S, S)."""
    size = image.shape[-1]
    out = []
    for v in views:
        crop = image[None, :, v.top:v.top + v.height, v.left:v.left + v.width]
        if (v.height, v.width) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode='bicubic', align_corners=False, antialias=True)
        out.append(crop.flip(-1) if v.flip else crop)
    return torch.cat(out)
