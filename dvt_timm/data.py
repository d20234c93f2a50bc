"""Images in, normalised tensors out: listing folders, safe loading, DVT's squash-resize."""
import contextlib
import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ['IMAGE_EXTENSIONS', 'list_images', 'unique_stems', 'as_rgb', 'load_image', 'image_size', 'image_to_tensor',
           'load_batch']

_logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
PathLike = Union[str, os.PathLike]


def list_images(source: PathLike) -> List[Path]:
    """Images in a folder (sorted, recursive, hidden ones left out), one image file, or the paths listed one
    per line in a text file (relative to the list file's folder; blank lines, `#` comments and repeats are
    skipped)."""
    source = Path(source)
    if source.is_dir():  # hidden files and folders (.ipynb_checkpoints, ._x.jpg) are not the user's images
        return sorted(p for p in source.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                      and not any(part.startswith('.') for part in p.relative_to(source).parts))
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source]
    if source.is_file():
        try:
            text = source.read_text(encoding='utf-8-sig')  # a byte-order mark is not part of the first path
        except UnicodeDecodeError:
            raise ValueError(f'{source}: neither an image file ({", ".join(IMAGE_EXTENSIONS)}) nor a text file '
                             'listing image paths') from None
        lines = (line.strip() for line in text.splitlines())
        paths = [source.parent / line for line in lines if line and not line.startswith('#')]
        unique = list(dict.fromkeys(paths))
        if len(unique) < len(paths):
            _logger.warning('%s: %d repeated paths taken once', source, len(paths) - len(unique))
        return unique
    raise FileNotFoundError(f'no image folder or list file at {source}')


def unique_stems(paths: Sequence[Path]) -> List[str]:
    """The images' file stems, which name their outputs and cache entries; two alike are an error naming both."""
    seen: Dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise ValueError(f'two images share the name {p.stem!r}: {seen[p.stem]} and {p}; their results are named '
                             'by file stem, so rename one, or give each folder its own run (--out)')
        seen[p.stem] = p
    return list(seen)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float single-channel images as 8-bit ones: PIL's `convert('RGB')` would clip them at 255."""
    arr = np.asarray(img, dtype=np.float64)
    top = arr.max(initial=0.0)
    if img.mode.startswith('I;16'):
        scale = 65535.0
    elif img.mode == 'F' and top <= 1:
        scale = 1.0
    elif top <= 255:
        scale = 255.0
    elif top <= 65535:
        scale = 65535.0
    else:
        raise ValueError(f'pixel values up to {top:g} in a mode {img.mode!r} image have no known range')
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / scale)), 0, 255).astype(np.uint8), 'L')


@contextlib.contextmanager
def _open_image(path: PathLike) -> Iterator[Image.Image]:
    """`Image.open`, with every way a file can fail to be an image raised as `ValueError` naming it."""
    try:
        with Image.open(path) as img:
            yield img
    except Image.DecompressionBombError as e:
        raise ValueError(f'{path}: too large to decode safely ({e})') from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for missing/corrupt/unknown files
        raise ValueError(f'{path}: not a readable image ({e})') from e


def as_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB (grey, palette, RGBA, CMYK, ...; 16-bit and float grey rescaled to 8 bits)."""
    return (_to_8bit(img) if img.mode.startswith('I') or img.mode == 'F' else img).convert('RGB')


def load_image(path: PathLike) -> Image.Image:
    """Open an image as RGB (see `as_rgb`); a file that is not a readable image raises `ValueError` naming it."""
    with _open_image(path) as img:
        return as_rgb(img)


def image_size(path: PathLike) -> Tuple[int, int]:
    """(width, height) of an image from its header; errors as for `load_image`."""
    with _open_image(path) as img:
        return img.size


def image_to_tensor(
        img: Image.Image,
        size: Union[int, Tuple[int, int]],
        mean: Sequence[float],
        std: Sequence[float],
) -> torch.Tensor:
    """Squash-resize to `size` (H, W) with bicubic filtering, as DVT does, and normalise: (3, H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    arr = np.asarray(as_rgb(img).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def load_batch(
        paths: Iterable[PathLike],
        size: Union[int, Tuple[int, int]],
        mean: Sequence[float],
        std: Sequence[float],
) -> torch.Tensor:
    """Load, resize and normalise several images into one (B, 3, H, W) tensor."""
    return torch.stack([image_to_tensor(load_image(p), size, mean, std) for p in paths])
