"""Label-free artifact metrics for a set of dense feature maps (N, C, h, w).

All of them ask one question from different sides: how much of a ViT's output is a function of the patch
position rather than of the image? DVT's artifacts are a position-dependent pattern shared by all images
(and, for some models, a few high-norm tokens), so a clean feature set scores near 0 on the first three
metrics and has no norm outliers.

`mic` is an approximation of the maximal information coefficient (Reshef et al., Science 2011): the
maintained implementation, minepy 1.2.6, does not build on Python 3.11 / numpy 2 (its setup imports
`pkg_resources`, and its generated C code uses numpy 1.x internals). See `mic` for exactly what is computed.
"""
import math
from typing import Dict, Optional

import torch
from tqdm import tqdm

from .threads import single_thread

__all__ = [
    'variance_share', 'zero_input_cosine', 'mic', 'positional_mic', 'high_norm_stats', 'artifact_metrics',
]


def _check_maps(feats: torch.Tensor, name: str = 'feats') -> torch.Tensor:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f'{name} must be feature maps of shape (N, C, h, w), got {shape}')
    if feats.shape[0] < 1 or feats.shape[2] * feats.shape[3] < 2:
        raise ValueError(f'{name} needs at least one map with two or more positions, got {tuple(feats.shape)}')
    return feats.float()


def variance_share(feats: torch.Tensor) -> float:
    """Share of the feature variance (summed over channels) explained by the per-position mean over the set.

    `sum_p sum_c (m_pc - m_c)^2 * N / sum_n sum_p sum_c (x_npc - m_c)^2`, with m_pc the mean over images at
    position p and m_c the grand mean. A pattern that depends only on position scores 1; position-free
    data scores about 1/N (the per-position mean of N samples keeps 1/N of their variance), so compare sets
    of equal size.
    """
    x = _check_maps(feats).double()
    grand = x.mean(dim=(0, 2, 3), keepdim=True)
    total = (x - grand).pow(2).sum()
    if total == 0:
        return 0.0
    positional = (x.mean(dim=0, keepdim=True) - grand).pow(2).sum() * x.shape[0]
    return float(positional / total)


def _centred_flat(feats: torch.Tensor) -> torch.Tensor:
    # Each map minus its own per-channel spatial mean: what is left is the spatial pattern.
    return (feats - feats.mean(dim=(2, 3), keepdim=True)).flatten(1)


def zero_input_cosine(feats: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean |cosine| between each centred feature map and the centred `reference` map (C, h, w).

    The reference is the backbone's response to an all-mean (zero after normalisation) image: with no
    content, all that image's spatial structure is positional. A set whose maps copy that pattern scores
    near 1; maps with no trace of it score near 0 (about 1/sqrt(C*h*w) for random fields).
    """
    x = _check_maps(feats)
    if reference.ndim == 4 and reference.shape[0] == 1:
        reference = reference[0]
    if reference.shape != x.shape[1:]:
        raise ValueError(f'reference map {tuple(reference.shape)} does not match the feature maps {tuple(x.shape[1:])}')
    cos = torch.nn.functional.cosine_similarity(_centred_flat(x), _centred_flat(reference[None].float()), dim=1)
    return float(cos.abs().mean())


# ----------------------------------------------------------------------------------------------------- MIC
def _equipartition(values: torch.Tensor) -> torch.Tensor:
    """For rows of `values` (M, n): the rank of each entry's tie group start, so that
    `start * bins // n` equipartitions a row into `bins` while keeping equal values in one bin."""
    n = values.shape[1]
    sorted_vals, order = values.sort(dim=1, stable=True)
    pos = torch.arange(n, device=values.device).expand_as(order)
    new_group = torch.ones_like(sorted_vals, dtype=torch.bool)
    new_group[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    start_sorted = torch.where(new_group, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return torch.empty_like(start_sorted).scatter_(1, order, start_sorted)


def _sum_c_log_p(counts: torch.Tensor) -> torch.Tensor:
    """sum_q c_q log(c_q / sum c) over the last axis: n * -H(rows | column) contributed by a column."""
    tot = counts.sum(-1, keepdim=True)
    return (counts * (counts / tot.clamp_min(1)).clamp_min(1e-30).log()).sum(-1)


def _oriented_mic(rows_rank: torch.Tensor, cols: torch.Tensor, k: int, max_cells: int) -> torch.Tensor:
    """max over grids of I / log(min(nx, ny)) for one orientation, per row of the inputs.

    `rows_rank` (M, n): tie-group start ranks of the axis that is equipartitioned into ny rows.
    `cols` (M, n) in [0, k): ordered clumps of the other axis, merged optimally into nx <= k columns by
    dynamic programming (Reshef et al.'s OptimizeXAxis on superclumps). Grids satisfy nx * ny <= max_cells.
    """
    M, n = cols.shape
    device = cols.device
    best = torch.zeros(M, device=device)
    offsets = torch.arange(M, device=device)[:, None]
    a_idx = torch.arange(k + 1, device=device)
    invalid = a_idx[:, None] >= a_idx[None, :]  # spans need a < b
    for ny in range(2, max_cells // 2 + 1):
        nx_max = min(max_cells // ny, k)
        if nx_max < 2:
            break
        rows = rows_rank * ny // n
        flat = (offsets * k + cols) * ny + rows
        counts = torch.bincount(flat.flatten(), minlength=M * k * ny).view(M, k, ny).float()
        p_rows = counts.sum(1) / n
        h_rows = -(p_rows * p_rows.clamp_min(1e-30).log()).sum(1)
        cum = torch.cat([counts.new_zeros(M, 1, ny), counts.cumsum(1)], dim=1)  # (M, k+1, ny)
        if nx_max == 2:  # only splits into a prefix and a suffix: O(k) spans instead of O(k^2)
            prefix, suffix = cum[:, 1:k], cum[:, k:k + 1] - cum[:, 1:k]
            neg_cond = (_sum_c_log_p(prefix) + _sum_c_log_p(suffix)).max(dim=1).values / n  # -H(rows | columns)
            best = torch.maximum(best, (h_rows + neg_cond) / math.log(2))
            continue
        span = cum[:, None, :, :] - cum[:, :, None, :]  # [m, a, b, :] = counts of clumps a..b-1
        score = (_sum_c_log_p(span) / n).masked_fill(invalid, float('-inf'))
        F = torch.full((M, k + 1), float('-inf'), device=device)
        F[:, 0] = 0
        for nx in range(1, nx_max + 1):
            F = (F[:, :, None] + score).max(dim=1).values  # best split of clumps 0..b-1 into nx columns
            if nx >= 2:
                mi = h_rows + F[:, k]
                best = torch.maximum(best, mi / math.log(min(nx, ny)))
    return best.clamp(0, 1)


def mic(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.6, clumps: int = 32) -> torch.Tensor:
    """Approximate maximal information coefficient between `x` and each row of `y`.

    Args:
        x: (n,) or (M, n) samples of the first variable.
        y: (M, n) or (n,) samples of the second (broadcast against `x`).
        alpha: grids have nx * ny <= B(n) = max(n ** alpha, 4) cells, Reshef et al.'s standard choice.
        clumps: the optimised axis is first cut into at most this many equal-frequency superclumps.

    Returns: (M,) values in [0, 1].

    This is an approximation of Reshef et al.'s ApproxMaxMI, named as one: for each grid size and both
    orientations, one variable is equipartitioned into ny rows (ties kept together), the other is cut into
    at most `clumps` ordered superclumps, and a dynamic programme merges those into the nx columns that
    maximise the mutual information, normalised by log(min(nx, ny)). MIC is the maximum over grids. Against
    minepy's ApproxMaxMI it differs only in the superclump count (minepy uses c * nx, c = 15); for an axis
    with at most `clumps` distinct, evenly filled values - such as a patch-grid coordinate - the column
    optimisation is exact. Known answers: noiseless functional relations give 1; independent samples give
    a small positive bias that shrinks with n (about 0.1 at n = 1000).
    """
    x, y = torch.as_tensor(x).float(), torch.as_tensor(y).float()
    x, y = (t[None] if t.ndim == 1 else t for t in (x, y))
    x, y = torch.broadcast_tensors(x, y)
    if x.ndim != 2 or x.shape[1] < 4:
        raise ValueError(f'mic needs (M, n) samples with n >= 4, got {tuple(x.shape)}')
    n = x.shape[1]
    max_cells = max(int(n ** alpha), 4)
    k = max(2, min(clumps, n))
    with single_thread():  # thousands of small ops
        rank_x, rank_y = _equipartition(x), _equipartition(y)
        return torch.maximum(
            _oriented_mic(rank_y, rank_x * k // n, k, max_cells),  # y in rows, x optimised
            _oriented_mic(rank_x, rank_y * k // n, k, max_cells),  # x in rows, y optimised
        )


def _correlation_ratio(values: torch.Tensor, coord: torch.Tensor, bins: int) -> torch.Tensor:
    """eta^2 of each row of `values` (M, n) on a discrete coordinate: the share of its variance explained
    by the per-coordinate means. It sees any functional dependence, monotone or not."""
    M = values.shape[0]
    sums = values.new_zeros(M, bins).index_add_(1, coord, values)
    counts = torch.bincount(coord, minlength=bins).clamp_min(1).float()
    between = (sums.pow(2) / counts).sum(1) - values.sum(1).pow(2) / values.shape[1]
    total = (values - values.mean(1, keepdim=True)).pow(2).sum(1)
    return between / total.clamp_min(1e-12)


def positional_mic(
        feats: torch.Tensor,
        alpha: float = 0.6,
        clumps: int = 32,
        channels: Optional[int] = 16,
        max_images: Optional[int] = None,
        progress: bool = False,
) -> Dict[str, float]:
    """Positional dependence as in DVT's appendix: per image, the maximum over channels of
    MIC(feature, x) and of MIC(feature, y) over the image's patches, averaged over images.

    Returns `{'mic': mean of the two, 'mic_x': ..., 'mic_y': ..., 'images': count}`. MIC is `mic`'s
    approximation; the coordinate axis is never merged into superclumps (so its partition is optimised
    exactly). MIC on all channels costs seconds per image on a CPU, so by default the maximum is taken over
    the `channels` channels with the largest correlation ratio eta^2 with that coordinate (a screen that
    catches monotone and periodic dependence alike); `channels=None` evaluates every channel.
    `max_images` evaluates only the first that many maps.
    """
    x = _check_maps(feats)
    if max_images is not None:
        x = x[:max_images]
    N, C, h, w = x.shape
    flat = x.flatten(2)  # (N, C, n)
    k = max(clumps, h, w)  # a grid coordinate keeps all its distinct values as clumps
    coords = {'x': torch.arange(w).repeat(h), 'y': torch.arange(h).repeat_interleave(w)}
    out: Dict[str, float] = {}
    for axis, coord in coords.items():
        bins = int(coord.max()) + 1
        if channels is not None and channels < C:
            eta = torch.stack([_correlation_ratio(f, coord, bins) for f in flat])  # (N, C)
            picked = eta.topk(channels, dim=1).indices
            values = flat.gather(1, picked[:, :, None].expand(-1, -1, flat.shape[2]))
        else:
            values = flat
        # Images go through `mic` in chunks: its cost is mostly per call, not per row.
        chunk = max(1, 1024 // values.shape[1])
        scores = [mic(coord.float(), v.flatten(0, 1), alpha, k).view(v.shape[0], -1).max(dim=1).values
                  for v in tqdm(values.split(chunk), desc=f'MIC ({axis})', disable=not progress, leave=False)]
        out[f'mic_{axis}'] = float(torch.cat(scores).mean())
    return {'mic': (out['mic_x'] + out['mic_y']) / 2, **out, 'images': N}


# ---------------------------------------------------------------------------------------------- norms
def high_norm_stats(feats: torch.Tensor, k: float = 5.0) -> Dict[str, float]:
    """High-norm tokens: per image, tokens whose L2 norm exceeds median + k * MAD of that image's norms.

    Returns `{'high_norm_fraction': outlier tokens / all tokens, 'norm_max_median': mean over images of
    max norm / median norm, 'images_with_outliers': count}`. k = 5 MADs (about 3.4 standard deviations for
    Gaussian norms) keeps chance detections rare in a 1,024-token map.
    """
    x = _check_maps(feats)
    norms = x.norm(dim=1).flatten(1)  # (N, h*w)
    med = norms.median(dim=1, keepdim=True).values
    mad = (norms - med).abs().median(dim=1, keepdim=True).values
    outliers = norms > med + k * mad
    ratio = norms.max(dim=1).values / med[:, 0].clamp_min(1e-12)
    return {
        'high_norm_fraction': float(outliers.float().mean()),
        'norm_max_median': float(ratio.mean()),
        'images_with_outliers': int(outliers.any(dim=1).sum()),
    }


def artifact_metrics(
        feats: torch.Tensor,
        reference: Optional[torch.Tensor] = None,
        norm_k: float = 5.0,
        mic_images: Optional[int] = None,
        mic_channels: Optional[int] = 16,
        progress: bool = False,
) -> Dict[str, Optional[float]]:
    """All artifact metrics for one feature set; `zero_input_cosine` is None without a `reference` map."""
    out: Dict[str, Optional[float]] = {'variance_share': variance_share(feats)}
    out['zero_input_cosine'] = zero_input_cosine(feats, reference) if reference is not None else None
    out.update(positional_mic(feats, channels=mic_channels, max_images=mic_images, progress=progress))
    out['mic_images'] = out.pop('images')
    out.update(high_norm_stats(feats, norm_k))
    return out
