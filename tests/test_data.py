"""Image input: listing, and loading files of every depth as the RGB images the backbone expects."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from dvt_timm.data import image_size, image_to_tensor, list_images, load_image


def test_sixteen_bit_and_float_grey_images_keep_their_brightness(tmp_path):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))  # 4x16 ramp
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'sixteen.png')  # PIL opens it as 'I;16'
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / 'float.tif')
    for name in ('sixteen.png', 'float.tif'):
        rgb = np.asarray(load_image(tmp_path / name))
        assert rgb.shape == (4, 16, 3), name
        np.testing.assert_allclose(rgb[..., 0], grey, atol=1, err_msg=name)


def test_an_image_too_large_to_decode_is_a_named_error(tmp_path, monkeypatch):
    Image.new('RGB', (64, 64)).save(tmp_path / 'big.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 64*64 > 2x the limit: PIL refuses to decode it
    for read in (load_image, image_size):  # the pixels, or only the header (evaluate --features)
        with pytest.raises(ValueError, match='big.png: too large to decode safely'):
            read(tmp_path / 'big.png')


def test_listing_one_file_a_list_or_a_folder(tmp_path):
    Image.new('RGB', (8, 8)).save(tmp_path / 'one.jpg')
    (tmp_path / 'list.txt').write_text('one.jpg\n# a comment\n\none.jpg\n')
    assert list_images(tmp_path / 'one.jpg') == [tmp_path / 'one.jpg']
    assert list_images(tmp_path / 'list.txt') == [tmp_path / 'one.jpg']  # the repeat is taken once
    for hidden in ('.ipynb_checkpoints/one.jpg', '._one.jpg'):  # notebook and macOS leftovers
        (tmp_path / hidden).parent.mkdir(exist_ok=True)
        Image.new('RGB', (8, 8)).save(tmp_path / hidden, format='JPEG')
    assert list_images(tmp_path) == [tmp_path / 'one.jpg']
    (tmp_path / 'bom.txt').write_text('one.jpg\n', encoding='utf-8-sig')  # as Notepad saves it
    assert list_images(tmp_path / 'bom.txt') == [tmp_path / 'one.jpg']
    Image.new('RGB', (8, 8)).save(tmp_path / 'anim.gif')  # a format we do not list: not read as a list of paths
    with pytest.raises(ValueError, match=r'anim.gif: neither an image file \(.jpg, .*\) nor a text file listing'):
        list_images(tmp_path / 'anim.gif')


def test_image_to_tensor_is_timms_squash_transform(sample_images):
    """Preprocessing checked against timm's own eval transform (squash resize, bicubic, ImageNet normalisation)
    and against hand-computed values, not against itself."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    img = load_image(sample_images[0])
    ours = image_to_tensor(img, (112, 140), mean, std)
    timms = create_transform(input_size=(3, 112, 140), interpolation='bicubic', crop_pct=1.0, crop_mode='squash',
                             mean=mean, std=std)(img)
    assert ours.shape == timms.shape == (3, 112, 140)
    torch.testing.assert_close(ours, timms, rtol=0, atol=1e-6)
    flat = image_to_tensor(Image.new('RGB', (30, 20), (255, 0, 128)), 14, mean, std)
    expected = [(1 - mean[0]) / std[0], (0 - mean[1]) / std[1], (128 / 255 - mean[2]) / std[2]]
    torch.testing.assert_close(flat[:, 7, 7], torch.tensor(expected), rtol=0, atol=1e-5)


def test_image_to_tensor_takes_a_pil_image_of_any_mode():
    """Grey, palette, alpha, CMYK and 16-bit images in memory are read as the RGB image they show."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 28, 3), dtype=np.uint8))
    ref = image_to_tensor(rgb, 14, mean, std)
    for img in (rgb.convert('RGBA'), rgb.convert('CMYK'), rgb.convert('P')):
        out = image_to_tensor(img, 14, mean, std)
        torch.testing.assert_close(out, image_to_tensor(img.convert('RGB'), 14, mean, std), rtol=0, atol=0)
        assert img.mode == 'P' or (out - ref).abs().max() < 0.05, img.mode  # P: the palette's colours
    grey = rgb.convert('L')
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    for img in (grey, sixteen):
        expected = image_to_tensor(grey.convert('RGB'), 14, mean, std)
        torch.testing.assert_close(image_to_tensor(img, 14, mean, std), expected, rtol=0, atol=0.03)
