"""The generalizable denoiser: a learnable position embedding plus one transformer block.

The structure follows DVT (Yang et al., ECCV 2024) exactly, so the authors' released weights load
without modification: a pre-norm block (LayerNorm eps 1e-6, qkv bias, GELU MLP of ratio 4, no layer
scale, no output norm) applied to patch tokens after adding a (1, K*K, C) position embedding that is
resized bicubically (antialiased) to the current patch grid.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import resample_abs_pos_embed

__all__ = ['Denoiser', 'DenoiserBlock', 'default_num_heads']


def default_num_heads(embed_dim: int) -> int:
    """DVT's attention heads for a width C: C / 64 (at least one)."""
    return max(embed_dim // 64, 1)


class Attention(nn.Module):
    """Multi-head self-attention on `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DenoiserBlock(nn.Module):
    """Standard pre-norm transformer block, with the key names of timm's `Block`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Denoiser(nn.Module):
    """Maps raw patch tokens (B, h*w, C) to denoised ones.

    Args:
        embed_dim: feature width C of the backbone.
        grid_size: side K of the learned position embedding (37 for patch 14 at 518 px, 32 for patch 16
            at 512 px).
        num_heads: attention heads; DVT uses C / 64.
    """

    def __init__(self, embed_dim: int, grid_size: int, num_heads: Optional[int] = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.grid_size = grid_size
        self.num_heads = num_heads or default_num_heads(embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, grid_size * grid_size, embed_dim) * 0.02)
        self.block = DenoiserBlock(embed_dim, self.num_heads)

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embedding resized to `grid` (h, w).

        Not cached: a cache keyed on the parameter can go stale when weights change in place, and the resize
        does not show in the forward time (`benchmarks/overhead.py --size 448`, resized every call: 1.062
        against the plain backbone, no more than at 518 px, where nothing is resized).
        """
        if tuple(grid) == (self.grid_size, self.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), num_prefix_tokens=0)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Denoise patch tokens `x` (B, h*w, C) laid out row-major on `grid` (h, w)."""
        if x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f'{x.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} patch grid')
        return self.block(x + self.pos_embed_for(grid))
