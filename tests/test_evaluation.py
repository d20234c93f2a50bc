"""Dense evaluation: label formats and folders, feature sources and caches, kNN, linear probe, LOST, and the
`evaluate` command (on synthetic data with known answers, and on real data from $DVT_SHARED)."""
import argparse
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from dvt_timm.evaluation import (
    IGNORE, ConfusionMatrix, LabeledFolder, boxes_from_label, connected_components, corloc, detect_label_format,
    extract_features, find_label_pairs, knn_segmentation, linear_probe, load_stage1, lost_box, lost_discovery,
    read_boxes, read_label, voc_colormap,
)
from dvt_timm.evaluation.commands import add_evaluate_parser, format_table
from dvt_timm.evaluation.linear_probe import fold_splits
from dvt_timm.evaluation.scores import bootstrap_miou, miou, upsample_argmax
from dvt_timm.fields.outputs import write_stage1
from dvt_timm.registry import load_model

VITS = 'dvt_vit_small_patch14_dinov2'


# ------------------------------------------------------------------------------------------- labels
def test_voc_colormap_matches_the_devkit():
    cmap = voc_colormap()
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]
    assert cmap[255].tolist() == [224, 224, 192]  # the void boundary


def _write(path: Path, arr: np.ndarray, mode: str = None, palette=None) -> Path:
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def test_read_label_formats(tmp_path):
    cmap = voc_colormap()
    idx = np.array([[0, 1, 15], [255, 20, 0]], dtype=np.uint8)
    rgb = _write(tmp_path / 'rgb.png', cmap[idx])
    pal = _write(tmp_path / 'pal.png', idx, 'P', cmap.flatten().tolist())
    expected = idx.astype(np.int64)
    expected[1, 0] = IGNORE
    assert (read_label(rgb, 'voc') == expected).all()
    assert (read_label(pal, 'voc') == expected).all()

    index = _write(tmp_path / 'idx.png', np.array([[0, 11, 3], [11, 7, 0]], dtype=np.uint8))
    assert read_label(index, 'index', ignore_index=11).tolist() == [[0, -1, 3], [-1, 7, 0]]
    assert read_label(index, 'index', ignore_index=0).tolist() == [[-1, 11, 3], [11, 7, -1]]

    binary = _write(tmp_path / 'bin.png', np.array([[0, 255], [255, 0]], dtype=np.uint8))
    assert read_label(binary, 'binary').tolist() == [[0, 1], [1, 0]]
    assert detect_label_format([binary]) == 'binary'
    assert detect_label_format([index]) == 'index'
    assert detect_label_format([rgb]) == 'voc'
    # Binary reading would merge every other class into 1, so a binary guess must hold for every file, not
    # only for the first ones probed.
    later = _write(tmp_path / 'later.png', np.array([[0, 1], [10, 11]], dtype=np.uint8))
    assert detect_label_format([binary] * 8 + [later]) == 'index'

    bad_colour = _write(tmp_path / 'bad.png', np.full((2, 2, 3), 17, dtype=np.uint8))
    with pytest.raises(ValueError, match=r'bad\.png.*not in the VOC palette'):
        read_label(bad_colour, 'voc')
    coco_like = _write(tmp_path / 'coco.png', np.array([[0, 1], [22, 199]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r'coco\.png: values \[22, 199\] are not VOC classes .*--labels-format index'):
        read_label(coco_like, 'voc')
    with pytest.raises(ValueError, match='single-channel'):
        read_label(rgb, 'index')
    with pytest.raises(ValueError, match='unknown label format'):
        read_label(rgb, 'coco')


def _labeled_folder(root: Path, n: int = 4, bad: int = None) -> Path:
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / 'images' / f'im{i}.jpg')
        mask = np.zeros((30, 40), dtype=np.uint8)
        mask[5:20, 10:30] = 3 + i % 2
        mask[0, :] = 9  # ignored
        if i == bad:
            (root / 'masks' / f'im{i}.png').write_bytes(b'not a png')
        else:
            Image.fromarray(mask).save(root / 'masks' / f'im{i}.png')
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(root / 'images' / 'unlabelled.jpg')
    return root


def test_labeled_folder_pairs_skips_bad_files_and_maps_classes(tmp_path, caplog):
    root = _labeled_folder(tmp_path / 'data', n=4, bad=2)
    with caplog.at_level(logging.WARNING):
        lf = LabeledFolder(root, labels_format='index', ignore_index=9)
    assert [p.name for p in lf.images] == ['im0.jpg', 'im1.jpg', 'im3.jpg']  # unpaired and unreadable left out
    assert 'im2.jpg' in caplog.text and 'not a readable label image' in caplog.text
    assert list(lf.skipped) == [str(root / 'masks' / 'im2.png')]
    assert lf.class_values == [0, 3, 4] and lf.num_classes == 3
    assert lf.labels[0][0].tolist() == [IGNORE] * 40
    assert set(lf.labels[1].unique().tolist()) == {IGNORE, 0, 2}
    assert lf.names == ['images/im0', 'images/im1', 'images/im3']
    assert LabeledFolder(root, limit=1).labels_format == 'index'  # detected
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a value the files never hold: probably a mistyped flag
        assert LabeledFolder(root, labels_format='index', ignore_index=300).num_classes == 4
    assert 'no label file holds the ignore index 300' in caplog.text


def test_class_names_from_classes_yaml(tmp_path):
    root = _labeled_folder(tmp_path / 'data', n=2)
    (root / 'classes.yaml').write_text('classes: {0: background, 3: car}\n')
    assert LabeledFolder(root, labels_format='index', ignore_index=9).class_names() == ['background', 'car', '4']
    (root / 'classes.yaml').write_text('- background\n- car\n')  # a list, not a mapping
    with pytest.raises(ValueError, match=r'classes.yaml: expected "classes:" mapping label values to names'):
        LabeledFolder(root, labels_format='index', ignore_index=9).class_names()


def test_labeled_folder_skips_a_label_of_another_aspect_ratio(tmp_path, caplog):
    root = _labeled_folder(tmp_path / 'data', n=3)  # 40x30 images and masks
    Image.fromarray(np.full((10, 40), 3, np.uint8)).save(root / 'masks' / 'im1.png')  # cropped: stretched if scored
    Image.fromarray(np.full((15, 20), 3, np.uint8)).save(root / 'masks' / 'im2.png')  # half size, same aspect
    with caplog.at_level(logging.WARNING):
        lf = LabeledFolder(root, labels_format='index', ignore_index=9)
    assert [p.name for p in lf.images] == ['im0.jpg', 'im2.jpg'] and lf.labels[1].shape == (15, 20)
    assert 'im1.png: label is 40x10 but its image im1.jpg is 40x30' in caplog.text
    assert 'aspect ratio' in lf.skipped[str(root / 'masks' / 'im1.png')]


def test_pairing_layouts(tmp_path, caplog, monkeypatch):
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in (2, 10):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / f'{i}_image.png')
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / f'{i}_target.png')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(flat / '11_image.png')  # no target: said to be left out
    with caplog.at_level(logging.WARNING):
        pairs = find_label_pairs(flat)
    assert [(a.name, b.name) for a, b in pairs] == [('2_image.png', '2_target.png'), ('10_image.png', '10_target.png')]
    assert '1 of 3 images have no _target file and are left out: 11_image.png' in caplog.text
    (tmp_path / 'pics').mkdir()
    (tmp_path / 'anns').mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'pics' / 'x.jpg')
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'anns' / 'x.png')
    assert find_label_pairs(tmp_path / 'pics', labels_dir=tmp_path / 'anns') == [
        (tmp_path / 'pics' / 'x.jpg', tmp_path / 'anns' / 'x.png')]
    # A label folder inside the data folder, named by a relative path: its labels are not images.
    (tmp_path / 'pics' / 'gt').mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'pics' / 'gt' / 'x.png')
    monkeypatch.chdir(tmp_path)
    assert find_label_pairs('pics', labels_dir='pics/gt') == [(Path('pics/x.jpg'), Path('pics/gt/x.png'))]
    (tmp_path / 'pics' / 'gt' / 'x.png').unlink()
    (tmp_path / 'pics' / 'gt').rmdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'pics' / 'unlabelled.jpg')
    with caplog.at_level(logging.WARNING):  # an image without a label is left out, and said to be
        assert len(find_label_pairs(tmp_path / 'pics', labels_dir=tmp_path / 'anns')) == 1
    assert '1 of 2 images have no label and are left out: unlabelled.jpg' in caplog.text
    # Class subfolders mirrored in images/ and labels/: paired by path, never by the stem they share.
    for cls in ('a', 'b'):
        for side in ('images', 'labels'):
            (tmp_path / 'nested' / side / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'nested' / side / cls / '0.png')
    assert [(a.relative_to(tmp_path / 'nested').as_posix(), b.relative_to(tmp_path / 'nested').as_posix())
            for a, b in find_label_pairs(tmp_path / 'nested')] == [('images/a/0.png', 'labels/a/0.png'),
                                                                   ('images/b/0.png', 'labels/b/0.png')]
    (tmp_path / 'nested' / 'labels' / 'b' / '0.png').rename(tmp_path / 'nested' / 'labels' / '0.png')
    with caplog.at_level(logging.WARNING):  # a stem two images share does not pick a label for either by stem
        assert len(find_label_pairs(tmp_path / 'nested')) == 1
    assert '1 of 2 images have no label and are left out: b/0.png' in caplog.text
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert find_label_pairs(empty) == []
    with pytest.raises(ValueError, match='found no image/label pairs'):
        LabeledFolder(empty)
    with pytest.raises(FileNotFoundError):
        find_label_pairs(tmp_path / 'missing')


# -------------------------------------------------------------------------------------------- scores
def test_confusion_matrix_known_answer():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm.update(pred, target)
    s = cm.scores(['a', 'b', 'c'])
    # IoU: a 1/3, b 3/4, c 1/2; recall: a 1/2, b 1, c 1/2; 5 of 7 labelled pixels right.
    assert s['miou'] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert s['macc'] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert s['pixel_acc'] == pytest.approx(5 / 7)
    assert s['per_class_iou'] == {'a': pytest.approx(1 / 3, abs=1e-6), 'b': 0.75, 'c': 0.5}
    # The same formula over a batch of matrices; a matrix with no pixels has no mIoU.
    batch = miou(torch.stack([cm.matrix, torch.zeros_like(cm.matrix)]))
    assert batch[0].item() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3) and math.isnan(batch[1].item())
    with pytest.raises(ValueError, match='differ in shape'):
        cm.update(pred[:1], target)
    with pytest.raises(ValueError, match=r'class ids must be in \[0, 3\).*predictions in \[0, 3\]'):
        cm.update(torch.tensor([3, 0]), torch.tensor([0, 0]))  # not counted in another class's cell


def test_bootstrap_miou_pairs_the_resamples():
    g = torch.Generator().manual_seed(0)
    target = [torch.randint(0, 4, (6, 6), generator=g) for _ in range(12)]
    good, poor = ConfusionMatrix(4, keep_images=True), ConfusionMatrix(4, keep_images=True)
    for t in target:
        good.update(torch.where(torch.rand(t.shape, generator=g) < 0.9, t, (t + 1) % 4), t)
        poor.update(torch.where(torch.rand(t.shape, generator=g) < 0.5, t, (t + 1) % 4), t)
    per_image = {'raw': poor.image_matrices(), 'denoised': good.image_matrices()}
    assert per_image['raw'].shape == (12, 4, 4) and torch.equal(per_image['raw'].sum(0), poor.matrix)
    out = bootstrap_miou(per_image, baseline='raw', resamples=200, seed=1)
    assert out == bootstrap_miou(per_image, baseline='raw', resamples=200, seed=1)
    for name, cm in (('raw', poor), ('denoised', good)):
        lo, hi = out[name]['miou_ci']
        assert lo < cm.scores()['miou'] < hi
    # Better on every image: the whole paired interval of the change is above zero.
    assert out['denoised']['change_ci'][0] > 0 and out['denoised']['change_nonnegative'] == 1.0
    assert 'change_ci' not in out['raw']
    # The same predictions: the change is exactly zero in every resample.
    same = bootstrap_miou({'raw': per_image['raw'], 'denoised': per_image['raw'].clone()}, 'raw', resamples=50)
    assert same['denoised']['change_ci'] == (0.0, 0.0) and same['denoised']['change_nonnegative'] == 1.0
    with pytest.raises(ValueError, match='same shape'):
        bootstrap_miou({'raw': per_image['raw'], 'denoised': per_image['denoised'][:5]}, 'raw')
    with pytest.raises(ValueError, match='baseline'):
        bootstrap_miou(per_image, baseline='F')
    with pytest.raises(ValueError, match='resamples'):
        bootstrap_miou(per_image, resamples=0)
    with pytest.raises(RuntimeError, match='keep_images'):
        ConfusionMatrix(4).image_matrices()


def test_corloc_known_answer():
    pred = [(0, 0, 10, 10), (0, 0, 10, 10), (50, 50, 60, 60)]
    gt = [[(0, 0, 10, 12)], [(20, 20, 30, 30), (1, 1, 10, 10)], [(0, 0, 5, 5)]]
    assert corloc(pred, gt) == pytest.approx(2 / 3)
    assert math.isnan(corloc(pred, [[], [], []]))


# ------------------------------------------------------------------------------- synthetic protocols
def _synthetic_segmentation(n: int = 6, C: int = 16, grid: int = 8, seed: int = 0):
    """Features whose direction is the class of the patch (plus noise), labels at 4x the grid, and the scores
    of a perfect patch classifier upsampled bilinearly as the protocols do (region corners round off)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, C, generator=g) * 3
    feats, labels, perfect = [], [], ConfusionMatrix(3)
    for i in range(n):
        lab = torch.zeros(grid, grid, dtype=torch.long)
        r, c = (i * 2) % 5, (i * 3) % 5
        lab[r:r + 3, c:c + 4] = 1 + i % 2
        full = lab.repeat_interleave(4, 0).repeat_interleave(4, 1)
        full[0, :3] = IGNORE
        feats.append(protos[lab].permute(2, 0, 1) + 0.3 * torch.randn(C, grid, grid, generator=g))
        labels.append(full)
        one_hot = torch.nn.functional.one_hot(lab, 3).permute(2, 0, 1).float()
        perfect.update(upsample_argmax(one_hot, full.shape), full)
    return torch.stack(feats), labels, perfect.scores()


@pytest.mark.parametrize('mode', ['centroid', 'patch'])
def test_knn_known_answer_and_determinism(mode):
    feats, labels, perfect = _synthetic_segmentation()
    out = knn_segmentation(feats, labels, 3, k=5, mode=mode)
    assert out['miou'] == pytest.approx(perfect['miou']) and out['pixel_acc'] == pytest.approx(perfect['pixel_acc'])
    assert perfect['pixel_acc'] > 0.98
    assert out['split'] == 'leave-one-image-out' and out['queries'] == 6
    held = knn_segmentation(feats, labels, 3, k=5, mode=mode, holdout=0.5, seed=3)
    assert held['queries'] == 3 and held == knn_segmentation(feats, labels, 3, k=5, mode=mode, holdout=0.5, seed=3)
    # Shuffled features carry no class information: far from perfect.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = feats.flatten(2)[:, :, perm].view_as(feats)
    assert knn_segmentation(shuffled, labels, 3, k=5, mode=mode)['miou'] < 0.7
    with pytest.raises(ValueError, match='do not match'):
        knn_segmentation(feats[:2], labels, 3)
    # Per-image matrices (for the bootstrap): one per query image, adding up to the scored set.
    kept = knn_segmentation(shuffled, labels, 3, k=5, mode=mode, per_image=True)
    assert kept['image_matrices'].shape == (6, 3, 3)
    assert miou(kept['image_matrices'].sum(0)).item() == pytest.approx(kept['miou'])


def test_linear_probe_known_answer_and_determinism():
    feats, labels, _ = _synthetic_segmentation(n=8)
    a = linear_probe(feats, labels, 3, holdout=0.25, steps=100, lr=0.1, seed=1)
    b = linear_probe(feats, labels, 3, holdout=0.25, steps=100, lr=0.1, seed=1)
    assert a == b
    assert a['train_images'] == 6 and a['test_images'] == 2
    assert a['miou'] > 0.9 and a['final_train_loss'] < 0.1
    with pytest.raises(ValueError, match='fraction'):
        linear_probe(feats, labels, 3, holdout=1.5)


def test_linear_probe_folds_score_every_image_once():
    splits = fold_splits(10, 4, seed=2)
    tested = sorted(i for test, _ in splits for i in test)
    assert tested == list(range(10)) and [len(t) for t, _ in splits] == [3, 3, 2, 2]
    assert all(set(test).isdisjoint(train) and len(test) + len(train) == 10 for test, train in splits)
    feats, labels, _ = _synthetic_segmentation(n=8)
    out = linear_probe(feats, labels, 3, steps=100, lr=0.1, seed=1, folds=4)
    assert out['test_images'] == 8 and out['split'] == '4-fold (seed 1)'
    assert out['miou'] > 0.9 and out == linear_probe(feats, labels, 3, steps=100, lr=0.1, seed=1, folds=4)
    kept = linear_probe(feats, labels, 3, steps=100, lr=0.1, seed=1, folds=4, per_image=True)
    assert kept['image_matrices'].shape == (8, 3, 3)
    assert miou(kept['image_matrices'].sum(0)).item() == pytest.approx(out['miou'])
    with pytest.raises(ValueError, match='folds'):
        linear_probe(feats, labels, 3, folds=9)


def test_connected_components_and_derived_boxes():
    mask = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], bool)
    labels, count = connected_components(mask)
    assert count == 2 and labels[0, 0] == labels[1, 1] and labels[0, 3] == labels[2, 0] != labels[0, 0]
    label = torch.zeros(20, 30, dtype=torch.long)
    label[2:6, 3:9] = 1
    label[10:18, 20:28] = 1
    label[12:14, 1:3] = 2  # too small at min_area 0.01
    label[0, 0] = IGNORE
    assert sorted(boxes_from_label(label, min_area=0.01)) == [(3, 2, 9, 6), (20, 10, 28, 18)]
    assert boxes_from_label(label, classes=[2], min_area=0) == [(1, 12, 3, 14)]


def test_lost_finds_the_high_norm_object():
    g = torch.Generator().manual_seed(0)
    C, h, w = 16, 12, 12
    obj = torch.randn(C, generator=g)
    feat = 0.2 * torch.randn(C, h, w, generator=g) + torch.randn(C, 1, 1, generator=g)
    feat[:, 3:7, 5:10] += 3 * obj[:, None, None]
    box, seed = lost_box(feat, seed='norm', expand=10)
    assert box == (5, 3, 10, 7) and 3 <= seed[0] < 7 and 5 <= seed[1] < 10
    out = lost_discovery(feat[None], [(120, 240)], gt_boxes=[[(50, 60, 100, 140)]], expand=10)
    assert out['boxes'] == [(50.0, 60.0, 100.0, 140.0)] and out['corloc'] == 1.0
    with pytest.raises(ValueError, match="'norm' or 'degree'"):
        lost_box(feat, seed='attention')


def test_box_classes_name_label_values_not_class_ids():
    from dvt_timm.evaluation.commands import box_class_ids
    assert box_class_ids([0, 1, 2], None) == [1, 2]  # VOC: value 0, background, is id 0
    assert box_class_ids([1, 2, 3], None) == [0, 1, 2]  # COCO with value 0 ignored: person (1) is id 0
    assert box_class_ids([1, 2, 95], set(range(1, 91))) == [0, 1]


def test_read_boxes(tmp_path):
    good = tmp_path / 'boxes.json'
    good.write_text(json.dumps({'a': [[0, 0, 5, 5]], 'b': []}))
    assert read_boxes(good) == {'a': [(0.0, 0.0, 5.0, 5.0)], 'b': []}
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'a': [[0, 0, 5]]}))
    with pytest.raises(ValueError, match="boxes of 'a'"):
        read_boxes(bad)
    with pytest.raises(FileNotFoundError):
        read_boxes(tmp_path / 'none.json')


# ---------------------------------------------------------------------------------- feature sources
def _write_stage1(folder: Path, name: str, raw: torch.Tensor, denoised: torch.Tensor, **meta) -> None:
    """A stage-1 file as `dvt-timm denoise-images` writes it, from (C, h, w) maps (112 px input)."""
    patch = str(112 // raw.shape[-1])
    metadata = {'model': 'vit_small_patch14_dinov2.lvd142m', 'input_size': '112,112', 'patch_size': patch, **meta}
    write_stage1(folder / f'{name}.safetensors', raw.permute(1, 2, 0), denoised.permute(1, 2, 0), metadata,
                 dtype=torch.float32)


def test_load_stage1_folder(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    maps = {n: (torch.randn(8, 4, 4, generator=g), torch.randn(8, 4, 4, generator=g)) for n in ('a', 'b', 'c')}
    for n, (r, d) in maps.items():
        _write_stage1(tmp_path / 's1', n, r, d)
    _write_stage1(tmp_path / 's1', 'wrong', torch.zeros(8, 4, 4), torch.zeros(8, 4, 4), format='something-else')
    _write_stage1(tmp_path / 's1', 'nopatch', torch.zeros(8, 4, 4), torch.zeros(8, 4, 4), patch_size='0')
    with caplog.at_level(logging.WARNING):
        fs = load_stage1(tmp_path / 's1', names=['images/c', 'a', 'missing', 'wrong', 'nopatch'])
    assert fs.names == ['images/c', 'a'] and fs.input_size == (112, 112) and fs.grid == (4, 4)
    assert 'missing' in caplog.text and "format is 'something-else'" in caplog.text
    assert 'patch_size 0 must be positive' in caplog.text
    assert torch.equal(fs.maps['raw'][0], maps['c'][0])
    assert torch.equal(fs.maps['denoised'][1], maps['a'][1])
    # A stray file of another input size or backbone is skipped, naming it and the difference: the set is the
    # kind of most files (the first file's on a tie), even when the stray comes first.
    _write_stage1(tmp_path / 's2', 'x', torch.zeros(8, 4, 4), torch.zeros(8, 4, 4))
    _write_stage1(tmp_path / 's2', 'y', torch.zeros(8, 5, 5), torch.zeros(8, 5, 5))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_stage1(tmp_path / 's2').names == ['x']
    assert 'y.safetensors: features of vit_small_patch14_dinov2.lvd142m (8 channels, 112x112 input, 5x5 grid) ' \
           'differ from those of most files, vit_small_patch14_dinov2.lvd142m (8 channels, 112x112 input, 4x4 grid)' \
           in caplog.text
    for n in ('x', 'y'):
        _write_stage1(tmp_path / 's3', n, torch.zeros(8, 4, 4), torch.zeros(8, 4, 4))
    _write_stage1(tmp_path / 's3', 'a', torch.zeros(16, 4, 4), torch.zeros(16, 4, 4), model='vit_base_patch14_dinov2')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fs = load_stage1(tmp_path / 's3')
    assert fs.names == ['x', 'y'] and fs.model == 'vit_small_patch14_dinov2.lvd142m'
    assert 'a.safetensors: features of vit_base_patch14_dinov2 (16 channels' in caplog.text
    with pytest.raises(ValueError, match='no readable'):
        load_stage1(tmp_path / 's1', names=['missing'])


@pytest.fixture(scope='module')
def vits(vits_checkpoint):
    return load_model(VITS, str(vits_checkpoint), pretrained=False)


def test_extract_features_one_pass_and_disk_cache(vits, sample_images, tmp_path):
    calls = []
    hook = vits.backbone.patch_embed.register_forward_hook(lambda *a: calls.append(1))  # once per backbone pass
    try:
        fs = extract_features(vits, sample_images[:2], 112, cache_dir=tmp_path, progress=False)
        assert len(calls) == 2 + 1  # one backbone pass per image for both variants, plus the zero-input map
        with torch.inference_mode():
            raw, den = vits.raw_and_denoised(torch.stack([_input(p, vits) for p in sample_images[:2]]))
        assert torch.allclose(fs.maps['raw'], raw, atol=1e-5) and torch.allclose(fs.maps['denoised'], den, atol=1e-5)
        calls.clear()
        again = extract_features(vits, sample_images[:2], 112, variants=('raw',), cache_dir=tmp_path, progress=False)
        assert len(calls) == 1  # features from the cache: only the zero-input map ran
        assert torch.equal(again.maps['raw'], fs.maps['raw'])
        assert fs.image_sizes[0] == Image.open(sample_images[0]).size and fs.reference.shape == (384, 8, 8)
    finally:
        hook.remove()
    batched = extract_features(vits, sample_images[:3], 112, batch_size=2, progress=False)  # a full and a partial batch
    assert batched.names == [Path(p).stem for p in sample_images[:3]]
    assert torch.allclose(batched.maps['denoised'][:2], fs.maps['denoised'], atol=1e-4)
    with pytest.raises(ValueError, match='multiple of the patch size'):
        extract_features(vits, sample_images[:1], 100, progress=False)


def _input(path, model):
    from dvt_timm.data import image_to_tensor, load_image
    return image_to_tensor(load_image(path), 112, model.pretrained_cfg['mean'], model.pretrained_cfg['std'])


def test_extract_features_skips_unreadable_images(vits, sample_images, tmp_path, caplog):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'nope')
    with caplog.at_level(logging.WARNING):
        fs = extract_features(vits, [bad, sample_images[0]], 56, variants=('raw',), progress=False)
    assert fs.names == [Path(sample_images[0]).stem] and 'broken.png' in caplog.text
    with pytest.raises(TypeError, match=r'must be a list of image paths, got the single path .*; pass \['):
        extract_features(vits, str(sample_images[0]), 56, variants=('raw',), progress=False)  # not its characters


def test_extract_features_recomputes_a_corrupt_cache_file(vits, sample_images, tmp_path, caplog):
    fs = extract_features(vits, sample_images[:1], 56, variants=('raw',), cache_dir=tmp_path, progress=False)
    cached, = tmp_path.glob('*/*.safetensors')
    cached.write_bytes(cached.read_bytes()[:len(cached.read_bytes()) // 2])  # an interrupted copy
    with caplog.at_level(logging.WARNING):
        again = extract_features(vits, sample_images[:1], 56, variants=('raw',), cache_dir=tmp_path, progress=False)
    assert 'recomputing' in caplog.text and 'not a readable safetensors file' in caplog.text
    assert torch.allclose(again.maps['raw'], fs.maps['raw'], atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # rewritten
        extract_features(vits, sample_images[:1], 56, variants=('raw',), cache_dir=tmp_path, progress=False)
    assert 'recomputing' not in caplog.text


def test_extract_features_cache_sees_an_image_replaced_at_the_same_path(vits, sample_images, tmp_path):
    photo = tmp_path / 'photo.png'
    photo.write_bytes(sample_images[0].read_bytes())
    first = extract_features(vits, [photo], 56, variants=('raw',), cache_dir=tmp_path / 'cache', progress=False)
    photo.write_bytes(sample_images[1].read_bytes())
    again = extract_features(vits, [photo], 56, variants=('raw',), cache_dir=tmp_path / 'cache', progress=False)
    fresh = extract_features(vits, [photo], 56, variants=('raw',), progress=False)
    assert torch.equal(again.maps['raw'], fresh.maps['raw'])
    assert not torch.allclose(again.maps['raw'], first.maps['raw'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_extract_features_runs_a_cuda_model_and_mixes_in_cached_maps(tmp_path):
    import copy
    torch.manual_seed(0)  # random weights: the test is about devices, so it needs no $DVT_SHARED
    model = load_model(VITS, pretrained=False)
    images = sorted((Path(__file__).parents[1] / 'examples' / 'assets').glob('*.png'))[:2]
    cpu = extract_features(model, images[:1], 56, cache_dir=tmp_path, progress=False)  # caches image 0
    fs = extract_features(copy.deepcopy(model).cuda(), images, 56, cache_dir=tmp_path, progress=False)
    assert all(m.device.type == 'cpu' for m in fs.maps.values()) and fs.reference.device.type == 'cpu'
    assert torch.equal(fs.maps['raw'][:1], cpu.maps['raw'])  # read from the cache
    fresh = extract_features(model, images[1:], 56, progress=False)

    def close(a, b):  # computed on the GPU in fp32, where cuDNN may use TF32 for the patch embedding
        return float((a - b).norm() / b.norm()) < 1e-2
    assert close(fs.maps['raw'][1:], fresh.maps['raw']) and close(fs.maps['denoised'][1:], fresh.maps['denoised'])
    assert close(fs.reference, cpu.reference)


# ------------------------------------------------------------------------------------------- command
def _evaluate(argv):
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['evaluate', *argv])
    return args.func(args)


@pytest.mark.parametrize('flag, value, message', [
    ('--k', '0', 'must be at least 1, got 0'), ('--temperature', '0', 'must be a number above 0, got 0'),
    ('--mic-channels', '0', 'must be at least 1'), ('--mic-images', '0', 'must be at least 1'),
    ('--limit', '0', 'must be at least 1'), ('--limit', '-1', 'must be at least 1, got -1'),
    ('--probe-steps', '0', 'must be at least 1'), ('--lr', '-0.1', 'must be a number above 0'),
    ('--lost-expand', '0', 'must be at least 1'), ('--norm-k', '0', 'must be a number above 0'),
    ('--batch-size', '0', 'must be at least 1'), ('--size', '0', 'must be at least 1'),
    ('--min-box-area', '1.5', r'must be a share of the image in \[0, 1\], got 1.5'),
    ('--temperature', 'nan', 'must be a number above 0, got nan'),
    ('--bootstrap', '1', 'must be at least 100 for a 95% interval'),
    ('--seed', '99999999999999999999', r'must be in \[0, 2\*\*63 - 1\]'), ('--seed', '-1', 'must be in'),
])
def test_evaluate_command_refuses_bad_option_values(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        _evaluate(['--features', 'none', '--protocol', 'artifacts', flag, value])
    assert re.search(f'argument {flag}: {message}', capsys.readouterr().err)


def test_evaluate_command_on_voc(vits_checkpoint, tmp_path, capsys, monkeypatch):
    data = shared_path('data', 'voc_val_samples')
    out = tmp_path / 'voc.json'
    argv = ['--model', VITS, '--backbone-checkpoint', str(vits_checkpoint), '--no-pretrained', '--data', str(data),
            '--size', '112', '--limit', '6', '--protocol', 'artifacts', 'knn', 'linear', 'lost', '--knn-mode',
            'centroid', 'patch', '--boxes-from-masks', '--probe-steps', '5', '--mic-images', '2', '--out', str(out),
            '--cache', str(tmp_path / 'cache'), '--bootstrap', '100']
    loaded = []  # the model the command builds (its denoiser is random: --no-pretrained)
    monkeypatch.setattr('dvt_timm.evaluation.commands.load_model',
                        lambda *a, **k: loaded.append(load_model(*a, **k)) or loaded[-1])
    report = _evaluate(argv)
    printed = capsys.readouterr().out
    assert 'knn-centroid' in printed and 'CorLoc' in printed and 'denoised' in printed and 'change' in printed
    saved = json.loads(out.read_text())
    assert saved['images'] == 6 and saved['grid'] == [8, 8] and saved['classes']['background'] == 0
    results = saved['results']
    assert set(results) == {'artifacts', 'knn-centroid', 'knn-patch', 'linear', 'lost'}
    for key, per_variant in results.items():
        assert set(per_variant) == {'raw', 'denoised'}, key
    assert 0 <= results['knn-centroid']['raw']['miou'] <= 1 and results['linear']['raw']['test_images'] == 2
    assert 0 <= results['lost']['raw']['corloc'] <= 1 and results['artifacts']['raw']['zero_input_cosine'] > 0
    # --bootstrap: intervals for the segmentation protocols only, printed and saved; the matrices are not saved.
    assert 'intervals, images resampled' in printed and 'change [' in printed
    for key in ('knn-centroid', 'knn-patch', 'linear'):
        lo, hi = results[key]['raw']['miou_ci']
        assert 0 <= lo <= hi <= 1, key
        assert 'change_ci' in results[key]['denoised'] and 'image_matrices' not in results[key]['raw']
    assert 'miou_ci' not in results['artifacts']['raw'] and 'miou_ci' not in results['lost']['raw']
    # Each column scores its own maps: the protocols called directly on the same model's features agree.
    folder = LabeledFolder(data, limit=6)
    fs = extract_features(loaded[0], folder.images, 112, names=folder.names, progress=False)
    for v in ('raw', 'denoised'):
        for mode in ('centroid', 'patch'):
            assert results[f'knn-{mode}'][v]['miou'] == knn_segmentation(
                fs.maps[v], folder.labels, folder.num_classes, mode=mode)['miou'], (mode, v)
        assert results['linear'][v]['miou'] == linear_probe(fs.maps[v], folder.labels, folder.num_classes,
                                                            steps=5)['miou'], v
    assert results['knn-patch']['raw'] != results['knn-patch']['denoised']
    # Deterministic for a fixed seed (features come from the cache the first run wrote).
    again = _evaluate(argv)
    assert again['results'] == report['results']


def test_evaluate_command_writes_strict_json(vits_checkpoint, tmp_path):
    """A score that does not exist (CorLoc without boxes) is null in the results file: NaN is not JSON, and
    strict parsers (JavaScript's, jq's) reject it."""
    out = tmp_path / 'lost.json'
    _evaluate(['--model', VITS, '--backbone-checkpoint', str(vits_checkpoint), '--no-pretrained', '--data',
               str(shared_path('data', 'voc_val_samples')), '--size', '56', '--limit', '2', '--protocol', 'lost',
               '--out', str(out)])

    def refuse(constant):
        raise ValueError(f'{constant} in {out}')
    saved = json.loads(out.read_text(), parse_constant=refuse)
    assert saved['results']['lost']['raw']['corloc'] is None


def test_evaluate_command_rejects_a_bad_split_before_the_backbone_pass(vits_checkpoint, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError('the model was loaded before the split was checked')

    monkeypatch.setattr('dvt_timm.evaluation.commands.load_model', no_model)
    out = tmp_path / 'voc.json'
    common = ['--model', VITS, '--backbone-checkpoint', str(vits_checkpoint), '--data',
              str(shared_path('data', 'voc_val_samples')), '--limit', '3', '--out', str(out)]
    for folds in ('1', '4'):  # fewer than 2, more than the 3 images
        with pytest.raises(ValueError, match=r'folds must be in \[2, 3\] for 3 images'):
            _evaluate(common + ['--protocol', 'linear', '--probe-folds', folds])
    # Boxes keyed by names that match no image, and box classes no label holds, are named before it too.
    (tmp_path / 'boxes.json').write_text(json.dumps({'0': [[0, 0, 5, 5]]}))
    with pytest.raises(ValueError, match=r"no boxes for any of the 3 images \(keys are image stems, such as "
                                         r"'0_image'; the file has \['0'\]\)"):
        _evaluate(common + ['--protocol', 'lost', '--boxes', str(tmp_path / 'boxes.json')])
    for classes, message in (('5-1', 'the range 5-1 is empty'), ('300', 'none of these values occurs')):
        with pytest.raises(ValueError, match=message):
            _evaluate(common + ['--protocol', 'lost', '--boxes-from-masks', '--box-classes', classes])
    for protocol, flag in (('linear', '--probe-holdout'), ('knn', '--knn-holdout')):
        with pytest.raises(ValueError, match=r'holdout must be a fraction in \(0, 1\), got 1.5'):
            _evaluate(common + ['--protocol', protocol, flag, '1.5'])
    assert not out.exists()


def test_a_protocol_that_cannot_score_keeps_the_others_results(vits_checkpoint, tmp_path):
    """At 14 px (one patch) kNN scores but the artifact metrics cannot: kNN's results are still written."""
    out = tmp_path / 'tiny.json'
    with pytest.raises(ValueError, match=f'artifacts could not be scored .*; the other results are in {out}'):
        _evaluate(['--model', VITS, '--backbone-checkpoint', str(vits_checkpoint), '--data',
                   str(shared_path('data', 'voc_val_samples')), '--limit', '4', '--size', '14', '--variants', 'raw',
                   '--protocol', 'knn', 'artifacts', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert 'miou' in saved['results']['knn-centroid']['raw'] and 'artifacts' in saved['failed']


def test_evaluate_command_on_stage1_features_skips_an_unreadable_image(sample_images, tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    (tmp_path / 'photos').mkdir()
    for n, source in (('a', sample_images[0]), ('b', sample_images[1]), ('c', None)):
        _write_stage1(tmp_path / 's1', n, torch.randn(384, 8, 8, generator=g), torch.randn(384, 8, 8, generator=g))
        (tmp_path / 'photos' / f'{n}.png').write_bytes(source.read_bytes() if source else b'not an image')
    with caplog.at_level(logging.WARNING):
        report = _evaluate(['--features', str(tmp_path / 's1'), '--data', str(tmp_path / 'photos'), '--protocol',
                            'artifacts', '--out', str(tmp_path / 'a.json'), '--mic-images', '1'])
    assert report['images'] == 2 and 'c.png' in caplog.text


def test_stored_features_must_come_from_these_pictures_and_weights(vits_checkpoint, sample_images, tmp_path,
                                                                    caplog):
    """Stage-1 files record their image's SHA-256 and the backbone's weights: features of another picture of the
    same name are left out, and a model of other weights would give the wrong zero-input reference."""
    from dvt_timm.checkpoint import file_sha256
    g = torch.Generator().manual_seed(0)
    (tmp_path / 'photos').mkdir()
    weights = f'sha256:{file_sha256(vits_checkpoint)}'
    for n, source in (('a', sample_images[0]), ('b', sample_images[1])):
        (tmp_path / 'photos' / f'{n}.png').write_bytes(source.read_bytes())
        _write_stage1(tmp_path / 's1', n, torch.randn(384, 8, 8, generator=g), torch.randn(384, 8, 8, generator=g),
                      image_sha256=file_sha256(source), backbone_weights=weights)
    (tmp_path / 'photos' / 'b.png').write_bytes(sample_images[2].read_bytes())  # another picture, same name
    common = ['--features', str(tmp_path / 's1'), '--data', str(tmp_path / 'photos'), '--protocol', 'artifacts',
              '--variants', 'raw', '--mic-images', '1', '--out', str(tmp_path / 'a.json')]
    with caplog.at_level(logging.WARNING):
        report = _evaluate(common + ['--model', VITS, '--backbone-checkpoint', str(vits_checkpoint)])
    assert report['images'] == 1 and re.search(r'b.safetensors: made from another picture .* than \S*b.png',
                                                caplog.text)
    for other in (['--no-pretrained'], []):  # random weights; timm's download (not the checkpoint stage 1 used)
        with pytest.raises(ValueError, match=f'with weights {weights}, but --model loads .*--backbone-checkpoint'):
            _evaluate(common + ['--model', VITS, *other])


def test_evaluate_command_on_stage1_features_and_errors(vits_checkpoint, tmp_path, capsys, caplog):
    g = torch.Generator().manual_seed(0)
    for n in ('a', 'b', 'c'):
        _write_stage1(tmp_path / 's1', n, torch.randn(384, 8, 8, generator=g), torch.randn(384, 8, 8, generator=g))
    # A stray file of another backbone is skipped, not a reason to stop.
    _write_stage1(tmp_path / 's1', 'd', torch.randn(768, 8, 8), torch.randn(768, 8, 8), model='vit_base_patch14_dinov2')
    with caplog.at_level(logging.WARNING):
        report = _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--out',
                            str(tmp_path / 'a.json'), '--mic-images', '1'])
    assert report['images'] == 3 and report['results']['artifacts']['raw']['zero_input_cosine'] is None
    assert 'd.safetensors: features of vit_base_patch14_dinov2 (768 channels' in caplog.text
    (tmp_path / 'file').write_text('')
    capsys.readouterr()
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file' / 'x.json'}: cannot create its folder"):
        _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--out',
                   str(tmp_path / 'file' / 'x.json')])
    assert capsys.readouterr().out == ''  # refused before the work, not after it
    # With the model, the zero-input reference is computed at the stored input size (112 -> an 8x8 grid).
    report = _evaluate(['--features', str(tmp_path / 's1'), '--model', VITS, '--backbone-checkpoint',
                        str(vits_checkpoint), '--no-pretrained', '--protocol', 'artifacts', '--variants', 'raw',
                        '--out', str(tmp_path / 'b.json'), '--mic-images', '1'])
    assert report['results']['artifacts']['raw']['zero_input_cosine'] < 0.2  # random maps: no positional pattern
    assert 'denoised' not in report['results']['artifacts']
    with pytest.raises(ValueError, match='--data is required'):
        _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'knn'])
    # The zero-input reference of another backbone would make |cos| meaningless.
    with pytest.raises(ValueError, match='holds features of vit_small_patch14_dinov2.lvd142m, but --model is '
                                         'vit_small_patch14_reg4_dinov2'):
        _evaluate(['--features', str(tmp_path / 's1'), '--model', 'vit_small_patch14_reg4_dinov2', '--no-pretrained',
                   '--protocol', 'artifacts', '--variants', 'raw', '--out', str(tmp_path / 'c.json')])
    with pytest.raises(ValueError, match='is a folder'):  # refused before the work, not after it
        _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--out', str(tmp_path / 's1')])
    with pytest.raises(ValueError, match='--variants'):
        _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--variants', 'clean'])
    # Stored features cannot be re-extracted: another --size is refused, not ignored; their own size is fine.
    with pytest.raises(ValueError, match=r'holds features of 112x112 inputs, but --size asks for 448x448'):
        _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--size', '448'])
    assert _evaluate(['--features', str(tmp_path / 's1'), '--protocol', 'artifacts', '--size', '112', '--out',
                      str(tmp_path / 'd.json'), '--mic-images', '1'])['images'] == 3
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        _evaluate(['--model', VITS, '--backbone-checkpoint', str(tmp_path / 'none.safetensors'), '--data',
                   str(tmp_path), '--protocol', 'artifacts'])
    with pytest.raises(ValueError, match='--device gpu0: '):
        _evaluate(['--model', VITS, '--data', str(tmp_path), '--protocol', 'artifacts', '--device', 'gpu0',
                   '--out', str(tmp_path / 'dev' / 'x.json')])
    assert not (tmp_path / 'dev').exists()  # refused before the --out folder is made
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--device cuda asks for CUDA, but torch sees no CUDA GPU'):
            _evaluate(['--model', VITS, '--data', str(tmp_path), '--protocol', 'artifacts', '--device', 'cuda'])


def test_format_table_marks_missing_values():
    table = format_table({'lost': {'raw': {'corloc': math.nan}, 'denoised': {'corloc': 0.5}}})
    assert 'n/a' in table and '50.00' in table
