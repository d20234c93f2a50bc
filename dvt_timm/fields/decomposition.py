"""Per-image decomposition y ≈ F(global coords) + G(view-local position) + Δ(y), many images at once.

F is a hash-grid neural field with a 2-layer MLP, G a learnable K x K map shared by all views of an
image, Δ an MLP on the raw feature (REFERENCE §1). Every image has its own parameters; the images of a
batch are stacked along a leading dimension so one optimisation step runs them all with a handful of
batched kernels. Their losses are summed, so each image's gradients, Adam updates and result are those
of optimising it alone, and each image's randomness (views, init, samples) comes from its own seed:
a result depends on the image and the seed only.
"""
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import distance
from .encoding import HashGridConfig, MultiHashGrid
from .table_adam import HashTableAdam

__all__ = [
    'FieldSettings', 'PRESETS', 'ImageFields', 'Decomposition', 'decompose', 'field_optimizers', 'image_seed',
    'sample_indices',
]


@dataclass(frozen=True)
class FieldSettings:
    """Stage-1 settings; the defaults are the paper's (REFERENCE §1)."""
    image_size: Optional[int] = None  # None: 518 for patch 14, 512 otherwise
    n_views: int = 768  # random views, plus the full image
    iterations: int = 20000
    samples_per_step: int = 2048  # patch samples per image and step, drawn from all its views
    full_view_share: float = 0.0  # share of those samples taken from the full view alone (paper: 0, no preference)
    lr: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 1e-5
    # Adam skips hash-table values without a gradient in a step (tiny-cuda-nn's rule, `HashTableAdam`); the
    # authors' code steps the whole table (False), which bounds a paper-settings step by memory bandwidth.
    sparse_table_adam: bool = True
    warmup_frac: float = 0.1  # linear warm-up, then cosine ...
    final_lr_frac: float = 0.1  # ... to lr * final_lr_frac (official code: 1e-2 -> 1e-3)
    residual_weight: float = 0.1  # phase 2: weight of MSE(Δ, sg(y - F - G))
    sparsity_weight: float = 0.02  # phase 2: weight of mean |Δ|
    hash: HashGridConfig = field(default_factory=HashGridConfig)
    crop_scale: Tuple[float, float] = (0.1, 0.5)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    amp: Optional[bool] = None  # bf16 autocast for feature extraction; None: where bf16 is native (`bf16_is_native`)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ('n_views', 'iterations', 'samples_per_step', 'image_size', 'seed'):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f'{name} must be an integer, got {value!r}')
            if value is not None and value < 1 and name != 'seed':  # 0 steps or samples: untrained fields as done
                raise ValueError(f'{name} must be at least 1, got {value}')
        if not 0 < self.lr < math.inf:
            raise ValueError(f'lr must be a finite number above 0, got {self.lr}')
        for name, low, high in (('full_view_share', 0, 1), ('warmup_frac', 0, 1), ('final_lr_frac', 0, 1),
                                ('residual_weight', 0, math.inf), ('sparsity_weight', 0, math.inf),
                                ('weight_decay', 0, math.inf)):
            if not low <= getattr(self, name) <= high:  # a negative final lr would ascend the loss, say
                raise ValueError(f'{name} must be in [{low}, {high}], got {getattr(self, name)}')
        for name, low, high in (('crop_scale', 0, 1), ('crop_ratio', 0, math.inf)):
            a, b = getattr(self, name)
            if not low < a <= b <= high:
                raise ValueError(f'{name} must be (min, max) with {low} < min <= max <= {high}, got {(a, b)}')
        if self.amp not in (None, True, False):
            raise ValueError(f'amp must be True, False or None (where bf16 is native), got {self.amp!r}')
        if not isinstance(self.hash, HashGridConfig):
            raise ValueError(f'hash must be a HashGridConfig, got {type(self.hash).__name__}')

    def with_overrides(self, **overrides) -> 'FieldSettings':
        """A copy with the given (non-None) settings changed."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS = {
    'paper': FieldSettings(),
    # CPU preset, chosen by measurement (benchmarks/stage1_presets.py, docs/stage1.md): at 448 px the 37
    # backbone passes dominate; more views bring F closest to a 96-view, 2000-step reference, while more
    # steps on few views overfit them. bf16 extraction (amp=None: where bf16 is native) is ~1.8x faster on
    # CPUs with bf16 units, ~5x slower on those without, which get fp32; the hash
    # grid is sized to a 32x32 feature grid (crops zoom in at most ~3x), the paper's one overfits here.
    # Half of the samples from the full view keeps F at the scale it is read out at (zoomed-in crops see
    # big objects as texture). With lr 0.03 it was the only setting at or above raw on both kNN banks of
    # VOC and COCO in benchmarks/stage1_knn.py (a quarter fell short on COCO's patch bank); over other
    # seeds and through the CLI F stays within about half a point of raw, sometimes below (docs/stage1.md).
    # Its small table is 21% touched per step, where the dense fused Adam (2.7 ms a step for 8 images)
    # beats gathering the touched values on the CPU (38 ms); F moves about as much as with another seed (docs/stage1.md).
    'fast': FieldSettings(
        image_size=448, n_views=36, iterations=300, samples_per_step=1024, full_view_share=0.5, lr=0.03,
        sparse_table_adam=False,
        hash=HashGridConfig(n_levels=8, n_features_per_level=8, log2_hashmap_size=15, base_resolution=16,
                            finest_resolution=256)),
}

_MASK63 = (1 << 63) - 1


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one image, from the run seed and the image's key (e.g. its file stem)."""
    return int.from_bytes(hashlib.blake2b(f'{seed}:{key}'.encode(), digest_size=8).digest(), 'little') & _MASK63


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (multiplication wraps; shifts are made logical by masking)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sample_indices(seeds: torch.Tensor, step: int, n: int, high: int) -> torch.Tensor:
    """(B, n) uniform indices in [0, high): counter-based, so image b's draws depend only on
    (seeds[b], step) — not on the batch it is in, nor on any RNG state."""
    counter = torch.arange(n, device=seeds.device, dtype=torch.int64) + step * n
    x = _mix64(seeds[:, None] * -7046029254386353131 + counter[None])  # 0x9e3779b97f4a7c15
    return (x & _MASK63) % high


class BatchedLinear(nn.Module):
    """One linear layer per image: (B, N, in) -> (B, N, out)."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features))

    def reset_image(self, b: int, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.weight.shape[1])  # nn.Linear's default init
        for p in (self.weight, self.bias):
            p.data[b] = (torch.rand(p.shape[1:], generator=generator) * 2 - 1) * bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class ImageFields(nn.Module):
    """F, G and Δ for `n_images` images with feature width C and a K x K patch grid."""

    def __init__(self, seeds: Sequence[int], embed_dim: int, grid: int, hash_config: HashGridConfig,
                 backend: str = 'auto') -> None:
        super().__init__()
        n, C = len(seeds), embed_dim
        self.grid = grid
        self.encoding = MultiHashGrid(hash_config, n_fields=n, backend=backend)
        self.semantic = nn.ModuleList([BatchedLinear(n, hash_config.output_dim, C // 2), BatchedLinear(n, C // 2, C)])
        self.artifact = nn.Parameter(torch.empty(n, grid * grid, C))
        self.residual = nn.ModuleList([BatchedLinear(n, C, C // 4), BatchedLinear(n, C // 4, C // 4),
                                       BatchedLinear(n, C // 4, C)])
        for b, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            self.encoding.params.data[b] = (torch.rand(self.encoding.params.shape[1:], generator=g) * 2 - 1) * 1e-4
            self.artifact.data[b] = torch.randn(self.artifact.shape[1:], generator=g) * 0.02
            for layer in (*self.semantic, *self.residual):
                layer.reset_image(b, g)

    @staticmethod
    def _mlp(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(layers):
            x = layer(x if k == 0 else F.relu(x))
        return x

    def semantics(self, coords: torch.Tensor) -> torch.Tensor:
        """F at image coordinates (B, N, 2) -> (B, N, C)."""
        return self._mlp(self.semantic, self.encoding(coords))

    def artifact_at(self, positions: torch.Tensor) -> torch.Tensor:
        """G at view-local patch positions (B, N) in [0, K*K) -> (B, N, C)."""
        return torch.gather(self.artifact, 1, positions[..., None].expand(-1, -1, self.artifact.shape[-1]))

    def residual_of(self, y: torch.Tensor) -> torch.Tensor:
        """Δ of raw features (B, N, C)."""
        return self._mlp(self.residual, y)


@dataclass
class Decomposition:
    """Stage-1 results for a batch of images, each (B, K, K, C) on the CPU, fp32; with `keep_views`, also every
    view's raw features and F at that view's image coordinates, (B, V, K, K, C), view 0 the full image."""
    raw: torch.Tensor  # backbone features of the full image
    denoised: torch.Tensor  # F on the full-image grid
    artifact: torch.Tensor  # G
    residual: torch.Tensor  # Δ of the full image's raw features
    view_raw: Optional[torch.Tensor] = None
    view_denoised: Optional[torch.Tensor] = None

    def __getitem__(self, b: int) -> 'Decomposition':
        return Decomposition(*(None if t is None else t[b] for t in (
            self.raw, self.denoised, self.artifact, self.residual, self.view_raw, self.view_denoised)))


def _lr_lambda(settings: FieldSettings):
    total, warmup = settings.iterations, max(int(settings.iterations * settings.warmup_frac), 1)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(total - warmup, 1)
        return settings.final_lr_frac + (1 - settings.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
    return fn


def field_optimizers(fields: ImageFields, settings: FieldSettings) -> List[torch.optim.Optimizer]:
    """Adam over every parameter of `fields`; with `sparse_table_adam` the hash table gets `HashTableAdam`."""
    hp = dict(lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    if not settings.sparse_table_adam:
        return [torch.optim.Adam(fields.parameters(), fused=True, **hp)]
    table = fields.encoding.params
    return [torch.optim.Adam([p for p in fields.parameters() if p is not table], fused=True, **hp),
            HashTableAdam([table], **hp)]


def decompose(
        features: torch.Tensor,
        coords: torch.Tensor,
        seeds: Sequence[int],
        settings: FieldSettings,
        backend: str = 'auto',
        progress=None,
        keep_views: bool = False,
) -> Decomposition:
    """Fit F, G, Δ to each image's view features.

    Args:
        features: (B, V, K, K, C) raw features of each image's views; view 0 is the full image.
        coords: (B, V, K, K, 2) image coordinates of those patches (`view_coords`).
        seeds: one seed per image (`image_seed`), for its init and its patch samples.
        settings: the optimisation settings.
        backend: hash-grid backend ('auto', 'torch', 'triton', 'tcnn').
        progress: optional callable(step) called every 100 steps.
        keep_views: also return every view's raw features and F at its coordinates (`view_raw`,
            `view_denoised`): V training pairs per image for stage 2 instead of one.
    """
    B, V, K, _, C = features.shape
    device = features.device
    fields = ImageFields(seeds, C, K, settings.hash, backend).to(device)
    opts = field_optimizers(fields, settings)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(settings)) for o in opts]
    feats = features.reshape(B, V * K * K, C)
    xy = coords.reshape(B, V * K * K, 2).to(device)
    seed_t = torch.tensor(seeds, dtype=torch.int64, device=device)
    phase2_start = settings.iterations // 2
    n_full = round(settings.full_view_share * settings.samples_per_step)

    for step in range(settings.iterations):
        idx = sample_indices(seed_t, step, settings.samples_per_step, V * K * K)
        if n_full:  # V*K*K is a multiple of K*K, so idx % (K*K) is uniform over the full view's patches
            idx = torch.cat([idx[:, :n_full] % (K * K), idx[:, n_full:]], 1)
        y = torch.gather(feats, 1, idx[..., None].expand(-1, -1, C)).float()
        f = fields.semantics(torch.gather(xy, 1, idx[..., None].expand(-1, -1, 2)))
        g = fields.artifact_at(idx % (K * K))
        if step < phase2_start:
            loss = distance(f + g, y)
        else:  # phase 2: G frozen; Δ learns the residual, F sees it only as a constant
            g = g.detach()
            d = fields.residual_of(y)
            loss = (distance(f + g + d.detach(), y)
                    + settings.residual_weight * (d - (y - f - g).detach()).square().mean((1, 2))
                    + settings.sparsity_weight * d.abs().mean((1, 2)))
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.sum().backward()
        for o, sc in zip(opts, scheds):
            o.step()
            sc.step()
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1)

    with torch.no_grad():
        full = xy[:, :K * K]  # view 0 is the full image: its coords are the full-image grid
        raw = feats[:, :K * K].float()
        maps = (raw, fields.semantics(full), fields.artifact.detach(), fields.residual_of(raw))
        out = Decomposition(*(t.reshape(B, K, K, C).float().cpu() for t in maps))
        if keep_views:  # opt-in: the paper preset's 769 views of ViT-B are 3.2 GB per image in fp32
            out.view_raw = features.float().cpu()
            # View 0 is the full image: its F is `denoised` itself, not a second evaluation that could round
            # differently. The crops go 64 at a time: all 768 at once would hold ~5 GB of MLP activations per image.
            crops = [fields.semantics(chunk).float().cpu() for chunk in xy[:, K * K:].split(64 * K * K, dim=1)]
            out.view_denoised = torch.cat([out.denoised.reshape(B, K * K, C), *crops], 1).reshape(B, V, K, K, C)
    return out
