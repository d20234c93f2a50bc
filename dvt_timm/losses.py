"""DVT's feature distance, shared by stage 1 (field fitting) and stage 2 (denoiser training)."""
import torch
import torch.nn.functional as F

__all__ = ['distance']


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE + (1 - mean cosine over the channel dim), per sample: (B, N, C) -> (B,).

    The mean over a batch of equal-size samples is the distance of the whole batch.
    """
    return (a - b).square().mean((1, 2)) + 1 - F.cosine_similarity(a, b, dim=-1).mean(1)
