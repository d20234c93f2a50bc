"""Artifact metrics: known answers on synthetic feature sets (pure position patterns, position-free fields)."""
import math

import pytest
import torch

from dvt_timm.evaluation.metrics import (
    artifact_metrics, high_norm_stats, mic, positional_mic, variance_share, zero_input_cosine,
)

N, C, H, W = 24, 32, 16, 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _position_pattern(channels: int = C, h: int = H, w: int = W) -> torch.Tensor:
    """(C, h, w): each channel a periodic function of x alone or of y alone (as ViT artifacts: stripes)."""
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing='ij')
    maps = []
    for c in range(channels):
        freq = 0.3 + 0.11 * c
        maps.append(torch.sin(freq * xx + c) if c % 2 else torch.cos(freq * yy + c))
    return torch.stack(maps)


def test_variance_share_known_answers():
    pattern = _position_pattern()
    noise = 0.01 * torch.randn(N, C, H, W, generator=_gen())
    assert variance_share(pattern.expand(N, -1, -1, -1) + noise) > 0.99
    random = torch.randn(N, C, H, W, generator=_gen(1))
    # Position-free: the per-position mean of N maps keeps about 1/N of their variance.
    assert variance_share(random) == pytest.approx(1 / N, rel=0.1)
    # A global offset per image is not positional.
    offsets = torch.randn(N, C, 1, 1, generator=_gen(2)).expand(-1, -1, H, W)
    assert variance_share(offsets + 0.01 * random) < 0.05


def test_zero_input_cosine_known_answers():
    pattern = _position_pattern()
    random = torch.randn(N, C, H, W, generator=_gen(3))
    # Content plus the positional pattern, and a per-image constant that centring removes.
    mixed = pattern + 0.5 * random + torch.randn(N, C, 1, 1, generator=_gen(4))
    assert zero_input_cosine(pattern.expand(N, -1, -1, -1) * 3 + 7, pattern) == pytest.approx(1.0, abs=1e-5)
    assert zero_input_cosine(-pattern.expand(N, -1, -1, -1), pattern) == pytest.approx(1.0, abs=1e-5)  # |cos|
    assert 0.6 < zero_input_cosine(mixed, pattern) < 0.99
    assert zero_input_cosine(random, pattern) < 0.05
    with pytest.raises(ValueError, match='does not match'):
        zero_input_cosine(random, pattern[:, :8])


def test_mic_known_answers():
    g = _gen(5)
    x = torch.rand(1000, generator=g)
    for y in (x, (x - 0.5) ** 2, torch.exp(3 * x)):
        assert float(mic(x, y)) > 0.95  # noiseless functional relations (exact MIC: 1)
    assert float(mic(x, torch.sin(12 * x))) > 0.9  # two periods: 32 superclumps fall a little short of 1
    # A step at the lower quartile: y takes two values, so the best grid's MI is H(y) and MIC = H(1/4) / log 2.
    step = (x > x.sort().values[249]).float()
    assert float(mic(x, step)) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2), abs=1e-5)
    assert float(mic(x, torch.rand(1000, generator=g))) < 0.1  # independent
    noisy = float(mic(x, x + 0.3 * torch.randn(1000, generator=g)))
    assert 0.2 < noisy < 0.7  # in between, and below the noiseless value
    # Symmetric, and batched rows agree with single calls.
    ys = torch.stack([x ** 2, torch.rand(1000, generator=g)])
    batched = mic(x, ys)
    assert batched.shape == (2,)
    assert torch.allclose(batched, torch.cat([mic(x, ys[0]), mic(x, ys[1])]))
    assert float(mic(ys[0], x)) == pytest.approx(float(batched[0]), abs=1e-6)
    with pytest.raises(ValueError, match='n >= 4'):
        mic(torch.ones(3), torch.ones(3))


def test_positional_mic_pattern_vs_random():
    pattern = _position_pattern().expand(4, -1, -1, -1) + 0.05 * torch.randn(4, C, H, W, generator=_gen(6))
    high = positional_mic(pattern)
    assert high['mic'] > 0.9 and high['mic_x'] > 0.9 and high['mic_y'] > 0.9
    low = positional_mic(torch.randn(4, C, H, W, generator=_gen(7)))
    assert low['mic'] < 0.2
    # Only x-dependence: high for x, low for y.
    xs = _position_pattern()[1::2][None]
    only_x = positional_mic(xs + 0.05 * torch.randn(xs.shape, generator=_gen(8)))
    assert only_x['mic_x'] > 0.9 and only_x['mic_y'] < 0.3


def test_positional_mic_channel_screen_finds_the_positional_channel():
    # One non-monotone positional channel hidden among noise: the eta^2 screen keeps it.
    feats = torch.randn(2, 64, H, W, generator=_gen(9))
    feats[:, 37] = torch.cos(torch.arange(W).float() * 2.1)[None, None, :]
    screened = positional_mic(feats, channels=4)
    full = positional_mic(feats, channels=None)
    assert screened['mic_x'] == pytest.approx(full['mic_x']) and screened['mic_x'] > 0.95


def test_high_norm_planted_token_is_counted():
    feats = torch.randn(N, C, H, W, generator=_gen(10))
    total = N * H * W
    base = high_norm_stats(feats)
    assert base['high_norm_fraction'] < 1e-3  # chance detections beyond 5 MADs are rare
    clean = base['images_with_outliers']
    feats[3, :, 5, 7] *= 20  # one planted high-norm token
    stats = high_norm_stats(feats)
    assert round((stats['high_norm_fraction'] - base['high_norm_fraction']) * total) == 1
    assert stats['images_with_outliers'] in (clean, clean + 1)
    assert stats['norm_max_median'] > base['norm_max_median'] + 15 / N  # the ratio of image 3 is about 20
    # A threshold of k MADs: a huge k finds nothing, planted or not.
    assert high_norm_stats(feats, k=1000)['high_norm_fraction'] == 0


def test_artifact_metrics_shapes_and_errors():
    feats = torch.randn(3, C, 8, 8, generator=_gen(11))
    out = artifact_metrics(feats)
    assert out['zero_input_cosine'] is None and out['mic_images'] == 3
    assert set(out) >= {'variance_share', 'mic', 'mic_x', 'mic_y', 'high_norm_fraction', 'norm_max_median'}
    assert all(isinstance(v, (int, float)) and not math.isnan(v) for k, v in out.items() if v is not None)
    assert artifact_metrics(feats, feats[0])['zero_input_cosine'] > 0
    with pytest.raises(ValueError, match=r'\(N, C, h, w\)'):
        variance_share(torch.randn(C, 8, 8))
