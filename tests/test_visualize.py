"""Feature pictures: PCA, K-means, colormaps, the figure, and the `visualize` command."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from dvt_timm.evaluation.commands import add_visualize_parser
from dvt_timm.fields import Decomposition
from dvt_timm.fields.visuals import stage1_figure
from dvt_timm.visualize import cluster_colors, colormap, feature_figure, kmeans, pca_fit, pca_rgb


def test_colormap_endpoints_and_errors():
    v = torch.tensor([[0.0, 0.5, 1.0, 2.0]])
    rgb = colormap(v)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [68, 1, 84] and rgb[0, 2].tolist() == [253, 231, 37]
    assert rgb[0, 3].tolist() == rgb[0, 2].tolist()  # clamped
    assert colormap(torch.tensor([0.5]), 'coolwarm')[0].tolist() == [221, 221, 221]  # white-ish centre
    with pytest.raises(ValueError, match='unknown colormap'):
        colormap(v, 'jet')
    assert cluster_colors(torch.tensor([0, 1, 12])).tolist()[2] == cluster_colors(torch.tensor([0])).tolist()[0]


def test_pca_finds_the_dominant_directions():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    coeffs = torch.randn(500, 16, generator=g) * torch.tensor([10.0, 5.0, 2.0] + [0.1] * 13)
    mean, comps = pca_fit(coeffs @ basis.T + 3)
    assert torch.allclose(mean, torch.full((16,), 3.0), atol=1.5)
    assert torch.allclose(comps @ comps.T, torch.eye(3), atol=1e-4)
    # Components match the planted basis up to sign, in order of variance.
    assert torch.allclose((comps @ basis[:, :3]).abs(), torch.eye(3), atol=0.05)


def test_pca_rgb_is_joint_and_in_range():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 6, 6, generator=g)
    rgbs = pca_rgb([a, a.clone(), 2 * a])
    assert all(r.shape == (3, 6, 6) and r.min() >= 0 and r.max() <= 1 for r in rgbs)
    assert torch.equal(rgbs[0], rgbs[1])  # one projection for all maps: equal features, equal colours
    assert not torch.equal(rgbs[0], rgbs[2])


def test_kmeans_separates_blobs_deterministically():
    g = torch.Generator().manual_seed(2)
    centres = torch.eye(4)[:3] * 5
    sizes = [50, 30, 20]
    x = torch.cat([c + 0.1 * torch.randn(n, 4, generator=g) for c, n in zip(centres, sizes)])
    labels = kmeans(x, 3, seed=0)
    assert labels.tolist() == [0] * 50 + [1] * 30 + [2] * 20  # ids ordered by cluster size
    assert torch.equal(labels, kmeans(x, 3, seed=0))
    assert sorted(kmeans(x[:2], 5).tolist()) == [0, 1]  # k capped at the number of points


def test_feature_figure_layout_and_errors():
    g = torch.Generator().manual_seed(3)
    images = [Image.new('RGB', (40, 30), (200, 10, 10)), Image.new('RGB', (20, 20), (10, 200, 10))]
    raw = torch.randn(2, 8, 4, 6, generator=g)
    fig = feature_figure(images, raw, raw + 0.1, panel_size=60, names=['a', 'b'])
    # 1 input + 4 kinds x 2 variants, panels 60 x 40 (the grid's aspect), 4 px gaps, 16 px header.
    assert fig.size == (9 * 64 + 4, 16 + 2 * 44 + 4)
    assert feature_figure(images, raw, None, panel_size=60).size == (5 * 64 + 4, 16 + 2 * 44 + 4)
    with pytest.raises(ValueError, match='do not match'):
        feature_figure(images[:1], raw)
    with pytest.raises(ValueError, match='fractional'):
        feature_figure(images, raw, patch=(2, 0))
    with pytest.raises(ValueError, match='differ from raw'):
        feature_figure(images, raw, raw[:, :4])


def test_stage1_figure_residual_panel_keeps_a_negligible_residual_dark():
    g = torch.Generator().manual_seed(4)
    raw = 10 * torch.randn(4, 4, 8, generator=g)
    image = Image.new('RGB', (20, 20), (90, 90, 90))

    def residual_panel(residual):
        fig = np.asarray(stage1_figure(image, Decomposition(raw, raw, torch.randn(4, 4, 8, generator=g), residual),
                                       panel=40))
        return fig[20:60, 4 + 4 * 44:4 + 4 * 44 + 40].astype(int)  # fifth panel, below the 16 px header

    dark, bright = colormap(torch.tensor([0.0]))[0], colormap(torch.tensor([1.0]))[0]
    tiny = residual_panel(torch.full((4, 4, 8), 1e-3))  # a constant Δ: the sparsity term's usual result
    assert np.abs(tiny - dark).max() <= 2
    spot = torch.zeros(4, 4, 8)
    spot[1, 2] = 30.0  # one outlier token, much larger than a tenth of the raw norm
    panel = residual_panel(spot)
    assert (panel[10:20, 20:30] == bright).all() and (panel[0:10, 0:10] == dark).all()


def _visualize(argv):
    parser = argparse.ArgumentParser()
    add_visualize_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['visualize', *argv])
    return args.func(args)


@pytest.mark.parametrize('flag, value, message', [
    ('--panel-size', '0', 'must be at least 1, got 0'), ('--limit', '0', 'must be at least 1, got 0'),
    ('--limit', '-1', 'must be at least 1, got -1'), ('--clusters', '0', 'must be at least 1, got 0'),
    ('--batch-size', '0', 'must be at least 1, got 0'), ('--size', '-56', 'must be at least 1, got -56'),
])
def test_visualize_command_refuses_bad_option_values(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        _visualize(['img.png', '--model', 'x', flag, value])
    assert f'argument {flag}: {message}' in capsys.readouterr().err


def test_visualize_command_real_backbone(vits_checkpoint, sample_images, tmp_path):
    out = tmp_path / 'fig.png'
    path = _visualize([str(p) for p in sample_images[:2]] + [
        '--model', 'dvt_vit_small_patch14_dinov2.dvt_timm_photos', '--backbone-checkpoint', str(vits_checkpoint),
        '--size', '112', '--panel-size', '64', '--clusters', '4', '--out', str(out)])  # our shipped denoiser
    assert path == out
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (9 * 68 + 4, 16 + 2 * 68 + 4)
        arr = np.asarray(img.convert('RGB'))
    assert arr[20:80, 72:136].std() > 10  # the PCA panel is a picture, not a blank
    for col in (1, 5):  # PCA and norm: the denoised panel (next column) shows other features than the raw one
        raw, den = (arr[20:84, 4 + c * 68:4 + c * 68 + 64] for c in (col, col + 1))
        assert np.abs(raw.astype(int) - den).mean() > 10, col
    with pytest.raises(ValueError, match='ROW,COL'):
        _visualize([str(sample_images[0]), '--model', 'x', '--patch', 'middle', '--out', str(out)])
    with pytest.raises(ValueError, match='ROW,COL'):
        _visualize([str(sample_images[0]), '--model', 'x', '--patch', '0.5', '--out', str(out)])
    with pytest.raises(ValueError, match=r"ROW,COL fractions in \[0, 1\].*got '1.5,0.5'"):  # before the model loads
        _visualize([str(sample_images[0]), '--model', 'x', '--patch', '1.5,0.5', '--out', str(out)])
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'file' / 'fig.png'}: cannot create its folder"):
        _visualize([str(sample_images[0]), '--model', 'x', '--out', str(tmp_path / 'file' / 'fig.png')])
    with pytest.raises(FileNotFoundError, match='no image'):
        _visualize([str(tmp_path / 'missing.png'), '--model', 'x', '--out', str(out)])
    (tmp_path / 'other').mkdir()
    twin = tmp_path / 'other' / f'{sample_images[0].stem}.jpg'  # same name, another picture
    twin.write_bytes(sample_images[1].read_bytes())
    with pytest.raises(ValueError, match=f"two images share the name '{sample_images[0].stem}'"):
        _visualize([str(sample_images[0]), str(twin), '--model', 'x', '--out', str(out)])
    with pytest.raises(ValueError, match='.png'):
        _visualize([str(sample_images[0]), '--model', 'dvt_vit_small_patch14_dinov2', '--backbone-checkpoint',
                    str(vits_checkpoint), '--no-pretrained', '--raw-only', '--size', '56', '--out',
                    str(tmp_path / 'fig.jpg')])


def test_visualize_reads_image_lists_as_the_other_commands_do(tmp_path):
    from dvt_timm.evaluation.commands import _collect_images
    Image.new('RGB', (8, 8)).save(tmp_path / 'a.png')
    Image.new('RGB', (8, 8)).save(tmp_path / 'b.gif')  # a format list_images does not name, still an image
    (tmp_path / 'chosen.list').write_text('a.png\n# not this one\n')
    assert _collect_images([str(tmp_path / 'chosen.list'), str(tmp_path / 'b.gif')]) == [tmp_path / 'a.png',
                                                                                       tmp_path / 'b.gif']


def test_visualize_never_reads_its_own_figure_back(vits_checkpoint, sample_images, tmp_path):
    (tmp_path / 'photos').mkdir()
    (tmp_path / 'photos' / 'a.png').write_bytes(sample_images[0].read_bytes())
    out = tmp_path / 'photos' / 'fig.png'  # written into the folder it reads
    args = [str(tmp_path / 'photos'), '--model', 'vit_small_patch14_dinov2', '--backbone-checkpoint',
            str(vits_checkpoint), '--raw-only', '--size', '56', '--panel-size', '32', '--out', str(out)]
    sizes = []
    for _ in range(2):
        _visualize(args)
        with Image.open(out) as img:
            sizes.append(img.size)
    assert sizes[0] == sizes[1]  # one row both times


def test_visualize_stored_features_skip_an_unreadable_image(sample_images, tmp_path, caplog):
    from dvt_timm.fields.outputs import write_stage1
    g = torch.Generator().manual_seed(0)
    (tmp_path / 'photos').mkdir()
    for n, source in (('a', sample_images[0]), ('b', None)):
        maps = torch.randn(2, 8, 8, 384, generator=g)
        write_stage1(tmp_path / 's1' / f'{n}.safetensors', maps[0], maps[1],
                     {'model': 'vit_small_patch14_dinov2.lvd142m', 'input_size': '112,112', 'patch_size': '14'})
        (tmp_path / 'photos' / f'{n}.png').write_bytes(source.read_bytes() if source else b'not an image')
    with caplog.at_level('WARNING'):
        _visualize([str(tmp_path / 'photos'), '--features', str(tmp_path / 's1'), '--panel-size', '32',
                    '--out', str(tmp_path / 'fig.png')])
    assert 'b.png' in caplog.text and (tmp_path / 'fig.png').is_file()
    with pytest.raises(ValueError, match=r'holds features of 112x112 inputs, but --size asks for 56x56'):
        _visualize([str(tmp_path / 'photos'), '--features', str(tmp_path / 's1'), '--size', '56',
                    '--out', str(tmp_path / 'fig.png')])
