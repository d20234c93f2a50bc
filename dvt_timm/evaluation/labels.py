"""Labeled image folders: pairing images with label PNGs, and reading VOC, class-index and binary labels.

Labels come out as int64 tensors (H, W) of contiguous class ids 0..K-1 with `IGNORE` (-1) where a pixel
is unlabelled; `LabeledFolder.class_values` maps the ids back to the values in the files.
"""
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..data import IMAGE_EXTENSIONS, image_size, list_images

__all__ = [
    'IGNORE', 'LABEL_FORMATS', 'VOC_CLASSES', 'voc_colormap', 'read_label', 'detect_label_format',
    'LabeledFolder', 'find_label_pairs', 'image_key',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

IGNORE = -1
LABEL_FORMATS = ('voc', 'index', 'binary')
VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
# Per format, the file value that means "unlabelled" unless --ignore-index says otherwise.
_DEFAULT_IGNORE = {'voc': 255, 'index': 255, 'binary': None}

# Layouts: `<stem><suffix>` pairs in one folder, or sibling image/label folders with equal stems.
_PAIR_SUFFIXES = (('_image', '_target'), ('_image', '_label'), ('_image', '_mask'), ('_img', '_mask'), ('', '_mask'),
                  ('', '_label'), ('', '_gt'))
_IMAGE_DIRS = ('images', 'image', 'imgs', 'JPEGImages', 'img')
_LABEL_DIRS = ('labels', 'label', 'masks', 'mask', 'annotations', 'targets', 'SegmentationClass', 'gt')


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (n, 3) uint8: class i's colour from the bits of i (VOC devkit's `labelcolormap`)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


_VOC_CODE_TO_INDEX = {int(code): i for i, code in enumerate(_rgb_codes(voc_colormap()))}


def read_label(path: PathLike, fmt: str, ignore_index: Optional[int] = None) -> np.ndarray:
    """Read one label file as raw class values (H, W) int64, with -1 for ignored pixels.

    Formats:
        voc: VOC colour-palette labels, either a palette ('P') PNG whose indices are the classes, or an RGB
            PNG whose colours are mapped back through the VOC palette; (224, 224, 192) / index 255 is the
            void boundary. A colour outside the palette raises `ValueError` naming it.
        index: a single-channel PNG of class indices (COCO, CamVid, ...).
        binary: a mask; 0 is background (0), anything else foreground (1).
    `ignore_index` is the file value (palette index for VOC) that marks unlabelled pixels; None takes the
    format's default (255 for voc and index, none for binary).
    """
    if fmt not in LABEL_FORMATS:
        raise ValueError(f'unknown label format {fmt!r}; expected one of {LABEL_FORMATS}')
    if ignore_index is None:
        ignore_index = _DEFAULT_IGNORE[fmt]
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img.convert('RGB') if fmt == 'voc' and mode not in ('P', 'L') else img)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f'{path}: not a readable label image ({e})') from e
    if fmt == 'voc':
        if arr.ndim == 3:
            codes = _rgb_codes(arr[..., :3])
            uniq, inverse = np.unique(codes, return_inverse=True)
            unknown = [f'#{int(u):06x}' for u in uniq if int(u) not in _VOC_CODE_TO_INDEX]
            if unknown:
                raise ValueError(f'{path}: colours {unknown[:5]} are not in the VOC palette')
            arr = np.array([_VOC_CODE_TO_INDEX[int(u)] for u in uniq], dtype=np.int64)[inverse.reshape(codes.shape)]
        out = arr.astype(np.int64)
        foreign = np.unique(out[(out > 20) & (out != 255) & (out != ignore_index)])
        if len(foreign):
            raise ValueError(f'{path}: values {foreign[:5].tolist()} are not VOC classes (0-20, 255 the void); for '
                             'a label of class indices use --labels-format index')
    elif arr.ndim != 2:
        raise ValueError(f'{path}: a {fmt} label must be a single-channel image, got mode {mode} {arr.shape}')
    else:
        out = arr.astype(np.int64)
    ignored = out == ignore_index if ignore_index is not None else np.zeros(out.shape, dtype=bool)
    if fmt == 'binary':
        out = (out != 0).astype(np.int64)
    out[ignored] = IGNORE
    return out


def _binary(values: set) -> bool:
    return values <= {0, 1} or values <= {0, 255}


def detect_label_format(paths: Sequence[PathLike], probe: int = 8) -> str:
    """Guess the label format: colour or palette images among the first `probe` files are `voc`; single-channel
    ones are `binary` when every file holds only {0, 1} or {0, 255} (all are read: binary reading would merge
    any other class into 1), else `index`. A guess, so `--labels-format` overrides it."""
    values: set = set()
    for i, p in enumerate(paths):
        if i >= probe and not _binary(values):
            break
        try:
            with Image.open(p) as img:
                if img.mode in ('RGB', 'RGBA', 'P'):
                    return 'voc'
                values.update(np.unique(np.asarray(img)).tolist())
        except (OSError, SyntaxError, ValueError):
            continue  # reported when the file is read for real
    if not values:
        raise ValueError('could not read any label file to detect the label format; pass --labels-format')
    return 'binary' if _binary(values) else 'index'


def _by_stem(files: Sequence[Path]) -> Dict[str, Path]:
    return {p.stem: p for p in files}


def _pair(images: Sequence[Path], image_root: Path, labels: Sequence[Path], label_root: Path,
          where: Path) -> List[Tuple[Path, Path]]:
    """(image, label) for the images that have a label: the one at the same path relative to its folder
    (`images/a/0.png` with `labels/a/0.png`), else the one of the same stem where neither side has two of that
    stem (a flat label folder for nested images). The others are logged."""
    by_path = {p.relative_to(label_root).with_suffix('').as_posix(): p for p in labels}
    label_stems, image_stems = Counter(p.stem for p in labels), Counter(p.stem for p in images)
    by_stem = {p.stem: p for p in labels if label_stems[p.stem] == 1}
    pairs, unlabelled = [], []
    for img in images:
        label = by_path.get(img.relative_to(image_root).with_suffix('').as_posix())
        if label is None and image_stems[img.stem] == 1:
            label = by_stem.get(img.stem)
        if label is None:
            unlabelled.append(img.relative_to(image_root).as_posix())
        else:
            pairs.append((img, label))
    if unlabelled and pairs:
        _logger.warning('%s: %d of %d images have no label and are left out: %s', where, len(unlabelled),
                        len(images), ', '.join(unlabelled[:5]) + (', ...' if len(unlabelled) > 5 else ''))
    return pairs


def find_label_pairs(root: PathLike, labels_dir: Optional[PathLike] = None) -> List[Tuple[Path, Path]]:
    """Pair images with labels in `root`. Recognised layouts (first match wins):

    - `labels_dir` given: images in `root` (recursively) and labels in `labels_dir` at the same relative path
      (or of the same stem, where that is unambiguous; see `_pair`);
    - sibling folders `root/images` + `root/labels` (or masks, annotations, ...), paired the same way;
    - one folder with `<id>_image.png` + `<id>_target.png` (also `_label`, `_mask`, `_gt` suffixes).
    Returns an empty list when nothing pairs.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'no data folder at {root}')
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        if not labels_dir.is_dir():
            raise FileNotFoundError(f'no label folder at {labels_dir}')
        labels_at = labels_dir.resolve()  # a label folder inside the data folder holds no images
        images = [p for p in list_images(root) if labels_at not in p.resolve().parents]
        return _pair(images, root, list_images(labels_dir), labels_dir, root)
    for img_dir in _IMAGE_DIRS:
        for lab_dir in _LABEL_DIRS:
            if (root / img_dir).is_dir() and (root / lab_dir).is_dir():
                pairs = _pair(list_images(root / img_dir), root / img_dir, list_images(root / lab_dir), root / lab_dir,
                              root)
                if pairs:
                    return pairs
    files = [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    stems = _by_stem(files)
    for img_suffix, lab_suffix in _PAIR_SUFFIXES:
        pairs, alone = [], []
        for stem, path in stems.items():
            if lab_suffix and stem.endswith(lab_suffix):
                continue
            if img_suffix and not stem.endswith(img_suffix):
                continue
            key = stem[:len(stem) - len(img_suffix)] if img_suffix else stem
            if key + lab_suffix in stems:
                pairs.append((path, stems[key + lab_suffix]))
            else:
                alone.append(path.name)
        if pairs:
            if alone:
                shown = ', '.join(alone[:5]) + (', ...' if len(alone) > 5 else '')
                _logger.warning('%s: %d of %d images have no %s file and are left out: %s', root, len(alone),
                                len(alone) + len(pairs), lab_suffix, shown)
            return sorted(pairs, key=lambda pair: _natural_key(pair[0].name))
    return []


def _natural_key(name: str) -> list:
    # '2_image' before '10_image'
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


@dataclass
class LabeledFolder:
    """Image/label pairs of a folder, read once into memory.

    Args:
        root: the data folder (see `find_label_pairs` for the layouts).
        labels_format: 'voc', 'index' or 'binary'; None detects it from the files.
        ignore_index: file value for unlabelled pixels; None uses the format's default.
        labels_dir: an explicit label folder (same stems as the images).
        limit: keep the first `limit` pairs.

    Unreadable or malformed label files, and labels whose aspect ratio is not their image's (a cropped or
    mismatched label: predictions are stretched onto the label), are logged with the reason and skipped. A
    label at another resolution of the same aspect (within 1%) is kept; predictions are resized to it.
    """
    root: PathLike
    labels_format: Optional[str] = None
    ignore_index: Optional[int] = None
    labels_dir: Optional[PathLike] = None
    limit: Optional[int] = None
    images: List[Path] = field(init=False)
    label_paths: List[Path] = field(init=False)
    labels: List[torch.Tensor] = field(init=False)
    class_values: List[int] = field(init=False)
    skipped: Dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        pairs = find_label_pairs(self.root, self.labels_dir)
        if not pairs:
            raise ValueError(
                f'{self.root}: found no image/label pairs (expected images/ + labels/ or masks/ folders with equal '
                'stems, or <id>_image.png + <id>_target.png files; or pass a label folder)')
        if self.limit is not None:
            pairs = pairs[:self.limit]
        if self.labels_format is None:
            self.labels_format = detect_label_format([lab for _, lab in pairs])
            _logger.info('%s: label format detected as %r', self.root, self.labels_format)
        raw, self.images, self.label_paths, self.skipped = [], [], [], {}
        for img, lab in pairs:
            try:
                label = read_label(lab, self.labels_format, self.ignore_index)
                _check_aspect(lab, label.shape, img)
            except ValueError as e:
                _logger.warning('skipping %s: %s', img.name, e)
                self.skipped[str(lab)] = str(e)
                continue
            raw.append(label)
            self.images.append(img)
            self.label_paths.append(lab)
        if not raw:
            raise ValueError(f'{self.root}: none of the {len(pairs)} label files could be read')
        if self.ignore_index is not None and not any((r == IGNORE).any() for r in raw):
            _logger.warning('%s: no label file holds the ignore index %d, so nothing is ignored; check '
                            '--ignore-index', self.root, self.ignore_index)
        values = sorted(set().union(*(np.unique(r).tolist() for r in raw)) - {IGNORE})
        if not values:
            raise ValueError(f'{self.root}: every label pixel is ignored (ignore index {self.ignore_index})')
        self.class_values = values
        lut = np.full(max(values) + 2, IGNORE, dtype=np.int64)  # the last slot maps IGNORE (-1) to itself
        lut[values] = np.arange(len(values))
        self.labels = [torch.from_numpy(lut[r]) for r in raw]

    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def names(self) -> List[str]:
        """A name per image: its path relative to the root, without suffix (unique, unlike stems)."""
        return [image_key(p, Path(self.root)) for p in self.images]

    def labels_for(self, names: Sequence[str]) -> List[torch.Tensor]:
        """The label maps of the named images in that order, e.g. of a `FeatureSet`'s `names`, which leave out
        images that could not be read."""
        index = {n: i for i, n in enumerate(self.names)}
        return [self.labels[index[n]] for n in names]

    def class_names(self) -> List[str]:
        """Names for the contiguous ids: VOC's for VOC labels, `classes.yaml` entries when the folder has one,
        else the file values."""
        table: Dict[int, str] = {}
        path = Path(self.root) / 'classes.yaml'
        if self.labels_format == 'voc':
            table = dict(enumerate(VOC_CLASSES))
        elif path.is_file():
            import yaml  # a timm dependency
            try:
                data = yaml.safe_load(path.read_text()) or {}
                table = {int(k): str(v) for k, v in (data.get('classes') or {}).items()}
            except (yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
                raise ValueError(f'{path}: expected "classes:" mapping label values to names, e.g. '
                                 f'"classes: {{0: background, 1: person}}" ({type(e).__name__}: {e})') from None
        return [table.get(v, str(v)) for v in self.class_values]

    def __len__(self) -> int:
        return len(self.images)


def _check_aspect(label_path: Path, label_shape: Tuple[int, int], image_path: Path, tol: float = 0.01) -> None:
    """ValueError naming both sizes when a label's aspect ratio differs from its image's by more than `tol`."""
    (lh, lw), (iw, ih) = label_shape, image_size(image_path)
    if abs(lw * ih - lh * iw) > tol * lh * iw:  # |lw/lh - iw/ih| > tol * iw/ih, without divisions
        raise ValueError(f'{label_path}: label is {lw}x{lh} but its image {image_path.name} is {iw}x{ih}; a label '
                         'of another aspect ratio (cropped or mismatched) cannot be scored')


def image_key(path: Path, root: Path) -> str:
    """An image's key: its path relative to `root` without suffix (its file name when outside `root`)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = Path(path.name)
    return rel.with_suffix('').as_posix()
