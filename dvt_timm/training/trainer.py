"""Stage 2 of DVT: train the generalizable denoiser on stage-1 (raw, F) pairs.

Loss distance(D(raw), F) = MSE + (1 - mean cosine over channels). The defaults are the authors'
(REFERENCE section 1): AdamW, betas (0.9, 0.999), weight decay 1e-5 on every parameter,
lr = 2e-4 * sqrt(global batch / 256), cosine with 15% linear warm-up down to 1e-6, no augmentation,
global batch 64 (the authors' 8 GPUs x 8). The denoiser starts from random weights, or from an existing
denoiser of the same backbone (`initial_checkpoint`, to fine-tune it on other pairs).

Reproducibility is by construction: the data order of every epoch is a seeded global permutation cut
into global batches (each of one patch grid), and each rank takes an interleaved slice of each batch,
so the order never depends on the number of processes; DDP averages per-rank mean-loss gradients,
which equals the one-process gradient of the global batch. A checkpoint (model, optimizer, scheduler,
step, every rank's RNG state, the best weights) is written atomically every `ckpt_every` steps; a resumed run
regenerates the same batches from the step counter, so it ends with the same weights as an
uninterrupted one (bit for bit on the CPU; on CUDA up to the kernels' own non-determinism).
The final denoiser is the last step's; `best/` holds the one of the validation with the lowest
held-out loss, as timm's train.py keeps `model_best`. Its weights are in the checkpoint too, and --resume
rewrites `best/` from them: a kill after a validation and before the next checkpoint may have left it ahead.
On several nodes every node needs the same `--data` files (checked); `--out` is written and read by
rank 0 alone, so it need not be shared.
"""
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import timm
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import (
    CARD_FRONT_MATTER, CARD_NAME, DenoiserConfig, atomic_write, backbone_arch, file_sha256, read_denoiser_checkpoint,
    same_backbone, short_cause, weights_path, write_denoiser_checkpoint,
)
from ..denoiser import Denoiser, default_num_heads
from ..losses import distance
from ..model import default_input_size
from ..precision import bf16_is_native
from ..registry import resolve_backbone
from .data import (
    Stage1Dataset, Stage1Error, Stage1Item, eval_batches, global_batches, rank_slice, scan_stage1, split_files,
    steps_per_epoch,
)

__all__ = [
    'TrainConfig', 'DistEnv', 'train', 'default_lr', 'lr_at', 'loss_text',
    'train_step', 'setup_distributed', 'CHECKPOINT_NAME', 'LOG_NAME', 'BEST_DIR',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = 'checkpoint.pt'
LOG_NAME = 'log.jsonl'
ARGS_NAME = 'training_args.json'
BEST_DIR = 'best'
TRAIN_STATE_FORMAT = 'dvt-timm-train'
TRAIN_STATE_VERSION = 1
DEFAULT_EPOCHS = 100

# Settings that shape the trajectory: a resumed run must use the same values to end where the
# uninterrupted run would. The rest (logging, checkpoint cadence, workers, device) may change.
_RUN_DEFINING = ('backbone', 'total_steps', 'batch_size', 'lr', 'weight_decay', 'betas', 'eps', 'warmup_frac',
                 'min_lr', 'val_frac', 'seed', 'amp', 'initial_checkpoint')


@dataclass
class TrainConfig:
    """Settings of a stage-2 run; the CLI flags map one to one (see `commands.py`)."""
    data: str  # folder of stage-1 `*.safetensors`
    model: str  # backbone timm id or registered dvt_* name; must match the data's backbone
    out: str  # output folder
    epochs: Optional[int] = None  # DEFAULT_EPOCHS when neither epochs nor steps is set
    steps: Optional[int] = None
    batch_size: int = 64  # global, over all processes
    lr: Optional[float] = None  # peak; None: 2e-4 * sqrt(batch_size / 256)
    weight_decay: float = 1e-5
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_frac: float = 0.15
    min_lr: float = 1e-6
    val_frac: float = 0.05
    val_every: int = 500  # steps; 0: only at the end
    ckpt_every: int = 500  # steps; 0: only at the end
    log_every: int = 10
    seed: int = 0
    workers: int = 2
    device: Optional[str] = None  # default: cuda when available, else cpu
    amp: bool = False  # bf16 autocast: faster where bf16 is native (`bf16_is_native`), slower elsewhere
    resume: bool = False
    verify_data: bool = False  # read every file in full at scan time and reject NaN/Inf
    initial_checkpoint: Optional[str] = None  # a denoiser to start from (fine-tuning) instead of a random one
    stop_after_steps: Optional[int] = None  # testing: SIGKILL this process right after that step


@dataclass
class DistEnv:
    """This process's place in the run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------------------- loss and schedule
def default_lr(global_batch: int) -> float:
    """The authors' peak learning rate for a global batch size."""
    return 2e-4 * math.sqrt(global_batch / 256)


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.15, min_lr: float = 1e-6) -> float:
    """Learning rate of (0-based) `step`: linear warm-up to `peak` over `warmup_frac` of the run, then
    cosine decay reaching `min_lr` at the last step."""
    warmup = int(round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup - 1, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_step(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        raw: torch.Tensor,
        clean: torch.Tensor,
        amp: bool = False,
        usable: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One optimisation step on a same-grid batch of (B, h, w, C) tensors; returns the detached loss.
    `usable` (B,) bool leaves skipped samples out of the loss, which stays a sum over B divided by B."""
    B, h, w, C = raw.shape
    with torch.autocast(raw.device.type, dtype=torch.bfloat16, enabled=amp):
        pred = model(raw.reshape(B, h * w, C), (h, w))
    d = distance(pred.float(), clean.reshape(B, h * w, C))  # the loss itself always in fp32
    loss = d.mean() if usable is None else (d * usable).sum() / B
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------- processes and devices
def setup_distributed(device: Optional[str] = None) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on the CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError(f'--device {device} asked for CUDA, but torch sees no CUDA GPU')
        if world > 1:
            gpus, local_world = torch.cuda.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', 0))
            if local_world > gpus:  # NCCL would fail later with "Duplicate GPU detected"
                raise RuntimeError(f'{local_world} processes on this node but torch sees {gpus} GPU(s); NCCL needs a '
                                   f'GPU per process: use --nproc_per_node {gpus}, or --device cpu (gloo)')
            dev = torch.device('cuda', local_rank % gpus)  # one GPU per process
        elif dev.index is None:
            dev = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', init_method='env://')
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def _rng_state() -> Dict[str, Any]:
    # Plain containers and tensors only, so the checkpoint loads with weights_only=True.
    return {
        'torch': torch.get_rng_state(),
        'cuda': list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        'python': random.getstate(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    random.setstate(state['python'])


# ---------------------------------------------------------------------------- backbone checks
def backbone_shape(name: str) -> Tuple[int, int]:
    """(embed_dim, patch_size) of a timm ViT, built without weights (on the meta device when possible)."""
    arch = backbone_arch(name)
    if not timm.is_model(arch):
        raise ValueError(f'--model {name}: {arch} is not a timm model')
    try:
        with torch.device('meta'):  # no memory, no init cost
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except (RuntimeError, NotImplementedError):  # an init that needs real tensors
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if not hasattr(model, 'patch_embed') or not hasattr(model, 'embed_dim'):
        raise ValueError(f'--model {name} is not a ViT with patch tokens')
    return model.embed_dim, model.patch_embed.patch_size[0]


# ---------------------------------------------------------------------------- data loading
class _BatchList(Sampler):
    """A batch sampler whose batches are replaced each epoch, so persistent workers can be reused."""

    def __init__(self) -> None:
        self.batches: List[List[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(dataset: Stage1Dataset, sampler: _BatchList, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == 'cuda',
                      persistent_workers=workers > 0)


class _Identity(nn.Module):
    """Raw features as the prediction: the held-out loss a denoiser has to beat."""

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return x


def _noting_skips(loader: DataLoader, skipped: Set[Path]) -> Iterator[Tuple[torch.Tensor, ...]]:
    """The batches of `loader`, adding to `skipped` the files its dataset skipped when reading them."""
    items = loader.dataset.items
    # A _BatchList yields the same index lists as the loader's iterator, in the same order.
    for ids, (raw, clean, usable) in zip(loader.batch_sampler, loader):
        if not usable.all():  # a CPU tensor: no device sync
            skipped.update(items[i].path for i, ok in zip(ids, usable.tolist()) if not ok)
        yield raw, clean, usable


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, env: DistEnv, amp: bool,
             skipped: Optional[Set[Path]] = None) -> Optional[float]:
    """Mean per-sample distance over the held-out files, summed over every rank's share. The files skipped
    when read are added to `skipped`."""
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)
    was_training = model.training
    model.eval()
    for raw, clean, usable in _noting_skips(loader, set() if skipped is None else skipped):
        raw, clean = raw.to(env.device, non_blocking=True), clean.to(env.device, non_blocking=True)
        usable = usable.to(env.device, torch.float64)
        B, h, w, C = raw.shape
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(raw.reshape(B, h * w, C), (h, w))
        d = distance(pred.float(), clean.reshape(B, h * w, C))
        totals += torch.stack([(d.double() * usable).sum(), usable.sum()])
    model.train(was_training)
    totals = _all_reduce_sum(totals, env)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else None


# ---------------------------------------------------------------------------- outputs
class _JsonLog:
    """Appends one JSON record per line (main process only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def __call__(self, **record: Any) -> None:
        if self.enabled:  # NaN / Inf as null: json.dumps would write NaN, which is not JSON
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, 'a') as f:
                f.write(json.dumps(record, default=str) + '\n')  # default: a Path or torch.device as text

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step`: a resumed run redoes them and logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if rec.get('step', 0) <= step:
                kept.append(line)
        atomic_write(self.path, lambda p: Path(p).write_text(''.join(line + '\n' for line in kept)))


def loss_text(loss: Optional[float], missing: str = 'n/a') -> str:
    """A held-out loss as logs, the CLI and the model card print it."""
    return missing if loss is None else f'{loss:.5f}'


def _model_card(backbone: str, input_size: Optional[int], settings: Dict[str, Any], step: int, n_train: int,
                n_val: int, val_loss: Optional[float], identity_loss: Optional[float]) -> str:
    val, identity = (loss_text(x, 'n/a (no held-out files)') for x in (val_loss, identity_loss))
    return CARD_FRONT_MATTER + f"""
# DVT denoiser for `{backbone}`

A [Denoising Vision Transformers](https://arxiv.org/abs/2401.02957) generalizable denoiser trained with
`dvt-timm train-denoiser` (stage 2) on stage-1 outputs. `model.safetensors` holds the denoiser only;
the backbone loads through timm.

```python
from dvt_timm import DenoisedViT
model = DenoisedViT.from_pretrained("path/to/this/folder").eval()
features = model.feature_map(images)  # (B, C, h, w), denoised
```

## Training

| setting | value |
|---|---|
| training / held-out files | {n_train} / {n_val} |
| input size of the stage-1 features | {f'{input_size} px' if input_size else 'mixed'} |
| steps | {settings['total_steps']} (these weights: step {step}) |
| global batch | {settings['batch_size']} |
| peak lr | {settings['lr']:.3g} (AdamW, betas {tuple(settings['betas'])}, weight decay {settings['weight_decay']}) |
| schedule | {settings['warmup_frac']:.0%} linear warm-up, cosine to {settings['min_lr']} |
| seed | {settings['seed']} |
| initial weights | {settings['initial_checkpoint'] or 'random'} |
| held-out loss of these weights (MSE + 1 - cosine) | {val} |
| held-out loss of raw features as the prediction | {identity} |
"""


def _write_denoiser(out: Path, weights: Dict[str, torch.Tensor], config: DenoiserConfig, settings: Dict[str, Any],
                    step: int, n_train: int, n_val: int, val_loss: Optional[float],
                    identity_loss: Optional[float]) -> None:
    """config.json, model.safetensors and a model card in `out` (made if need be), each written atomically."""
    write_denoiser_checkpoint(out, weights, config)
    card = _model_card(config.backbone, config.input_size, settings, step, n_train, n_val, val_loss, identity_loss)
    atomic_write(out / CARD_NAME, lambda p: Path(p).write_text(card))


# ---------------------------------------------------------------------------- the run
def _check_config(cfg: TrainConfig, env: DistEnv) -> None:
    if cfg.epochs is not None and cfg.steps is not None:
        raise ValueError('give --epochs or --steps, not both')
    for name in ('epochs', 'steps', 'stop_after_steps'):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be at least 1, got {value}')
    if cfg.batch_size < 1 or cfg.batch_size % env.world_size:
        raise ValueError(f'--batch-size {cfg.batch_size} (global) must be a positive multiple of the number of '
                         f'processes ({env.world_size})')
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f'--lr must be positive, got {cfg.lr}')
    if cfg.eps <= 0:
        raise ValueError(f'--eps must be positive, got {cfg.eps}')
    peak = cfg.lr or default_lr(cfg.batch_size)
    if not 0 <= cfg.min_lr <= peak:
        raise ValueError(f'--min-lr must be between 0 and the peak learning rate {peak:g}, got {cfg.min_lr:g}')
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError(f'--warmup-frac must be in [0, 1), got {cfg.warmup_frac}')
    if min(cfg.val_every, cfg.ckpt_every, cfg.log_every, cfg.workers) < 0:
        raise ValueError('--val-every, --ckpt-every, --log-every and --workers must not be negative')
    if cfg.amp and env.is_main and not bf16_is_native(env.device):
        _logger.warning('--amp on %s, which has no native bf16: bf16 autocast can be many times slower than fp32 '
                        'here (21x in benchmarks/stage2.py on an AVX2-only CPU); leave --amp out', env.device)


def _read_initial_checkpoint(path: Optional[str], backbone: str, embed_dim: int,
                             grid: int) -> Optional[Tuple[Dict[str, torch.Tensor], str]]:
    """The weights of --initial-checkpoint and its identity ('sha256:<hex>' of the weights file, so --resume can
    tell it changed), after checking it is a denoiser for `backbone` with the trainer's position-embedding grid."""
    if path is None:
        return None
    weights, config = read_denoiser_checkpoint(path)
    if config.backbone and not same_backbone(config.backbone, backbone):
        raise ValueError(f'--initial-checkpoint {path} is a denoiser for {config.backbone}, '
                         f'but the stage-1 features are {backbone}\'s')
    heads = default_num_heads(embed_dim)
    if (config.embed_dim, config.grid_size, config.num_heads) != (embed_dim, grid, heads):
        raise ValueError(f'--initial-checkpoint {path} has width {config.embed_dim}, {config.num_heads} heads and a '
                         f'{config.grid_size}x{config.grid_size} position embedding; the trainer\'s {backbone} '
                         f'denoiser has width {embed_dim}, {heads} heads and {grid}x{grid}')
    return weights, f'sha256:{file_sha256(weights_path(path))}'


def _data_digest(items: Sequence[Stage1Item]) -> str:
    """What identifies the stage-1 data beyond its file names: each file's size and header (backbone, settings,
    the image it came from and that image's hash)."""
    digest = hashlib.sha256()
    for it in items:
        digest.update(json.dumps([it.path.name, it.path.stat().st_size, it.metadata], sort_keys=True).encode())
    return digest.hexdigest()


def _check_resume(state: Dict[str, Any], settings: Dict[str, Any], train_names: List[str], val_names: List[str],
                  data_digest: str, path: Path) -> None:
    """A resumed run must be the same run: same run-defining settings and the same file split."""
    if not isinstance(state, dict) or state.get('format') != TRAIN_STATE_FORMAT:
        raise ValueError(f'{path}: not a dvt-timm training checkpoint; delete it to start over')
    if int(state.get('format_version', 0)) > TRAIN_STATE_VERSION:
        raise ValueError(f'{path}: written by a newer dvt-timm (format_version {state["format_version"]})')
    missing = sorted({'step', 'model', 'optimizer', 'scheduler', 'rng', 'settings', 'train_files', 'val_files'}
                     - state.keys())
    if missing:
        raise ValueError(f'{path}: a dvt-timm training checkpoint without {missing}; delete it to start over')
    saved = state['settings']
    diffs = [f'{k}: checkpoint {saved.get(k)!r}, now {settings[k]!r}' for k in _RUN_DEFINING
             if _plain(saved.get(k)) != _plain(settings[k])]
    if diffs:
        raise ValueError(f'--resume: {path} belongs to a run with other settings ({"; ".join(diffs)}); '
                         'rerun with the original settings or start a new --out')
    if list(state['train_files']) != train_names or list(state['val_files']) != val_names:
        # The held-out split is drawn from the whole set, so name what changed in the set, not each split.
        before, now = set(state['train_files']) | set(state['val_files']), set(train_names) | set(val_names)
        gone, new = sorted(before - now), sorted(now - before)
        raise ValueError(f'--resume: the stage-1 files changed since {path} was written '
                         f'(gone: {gone[:5]}{"..." if len(gone) > 5 else ""}; '
                         f'new: {new[:5]}{"..." if len(new) > 5 else ""}); restore them or start a new --out')
    if state.get('data_digest', data_digest) != data_digest:  # checkpoints before it was recorded: names only
        raise ValueError(f'--resume: the stage-1 files have the names they had when {path} was written, but other '
                         'contents (the images or settings they were made from); restore them or start a new --out')


def _read_resume_state(cfg: TrainConfig, path: Path, env: DistEnv) -> Optional[Dict[str, Any]]:
    """The training state to resume from, or None for a new run.

    Rank 0 decides and reads the file, then sends the outcome to every rank, so `--out` need not be
    on a filesystem the other nodes share, and all ranks fail alike on a refusal.
    """
    outcome: Tuple[Optional[str], Optional[Dict[str, Any]]] = (None, None)
    if env.is_main:
        if path.is_file() and not cfg.resume:
            outcome = (f'{path} exists: pass --resume to continue that run, or choose another --out', None)
        elif path.is_file():
            try:
                outcome = (None, torch.load(path, map_location='cpu', weights_only=True))
            except Exception as e:  # truncated by hand, or not ours: say which file and what to do
                outcome = (f'--resume: {path} cannot be read ({type(e).__name__}: {short_cause(e)}); delete it to '
                           'start over', None)
        elif cfg.resume:
            _logger.info('--resume: no %s yet, starting a new run', path)
    if env.distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    error, state = outcome
    if error:
        raise ValueError(error)
    return state


def _check_ranks_agree(value: Any, env: DistEnv, what: str) -> None:
    """Every rank must see the same `value` (e.g. the file list, which fixes every batch's contents)."""
    if not env.distributed:
        return
    digest = hashlib.sha256(json.dumps(value).encode()).hexdigest()
    digests = [None] * env.world_size
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f'ranks {differ} see different {what} than rank 0: every node needs the same --data')


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) stage-2 training; returns a summary. Call once per process under torchrun; a process
    group the caller made is used and left as it was."""
    ours = not (dist.is_available() and dist.is_initialized())
    env = setup_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        if ours and env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv) -> Dict[str, Any]:
    _check_config(cfg, env)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    backbone = resolve_backbone(cfg.model)
    if not timm.is_model(backbone_arch(backbone)):
        raise ValueError(f'--model {cfg.model} is not a timm model (see timm.list_models())')
    if '.' in backbone:  # the tag is written into the denoiser's config.json, which must load later
        try:
            timm.models.get_pretrained_cfg(backbone)
        except RuntimeError as e:
            raise ValueError(f'--model {cfg.model}: {e} (see timm.list_pretrained())') from None
    saved = _read_resume_state(cfg, ckpt_path, env)
    resume = saved is not None

    # Data: every rank scans the same folder the same way, so all agree on files, split and order.
    scan = scan_stage1(cfg.data, model=backbone, verify=cfg.verify_data, log=env.is_main)
    # Tags name different weights (e.g. .dino vs .mae): both given and different is an error; otherwise
    # the denoiser is recorded for the most specific id of the two.
    if '.' in backbone and '.' in scan.model and backbone != scan.model:
        raise Stage1Error(f'--model is {backbone} but the stage-1 files in {cfg.data} hold features of {scan.model}')
    data_backbone = scan.model if '.' in scan.model or '.' not in backbone else backbone
    embed_dim, patch = backbone_shape(data_backbone)
    if (embed_dim, patch) != (scan.embed_dim, scan.patch_size):
        raise Stage1Error(f'{cfg.data}: features have C={scan.embed_dim}, patch {scan.patch_size}, but '
                          f'{data_backbone} has C={embed_dim}, patch {patch}')
    train_items, val_items = split_files(scan.items, cfg.val_frac, cfg.seed)
    train_ds, val_ds = Stage1Dataset(train_items), Stage1Dataset(val_items)
    per_epoch = steps_per_epoch(train_ds.grids, cfg.batch_size)
    per_grid = Counter(train_ds.grids)
    if per_epoch == 0:
        raise ValueError(f'--batch-size {cfg.batch_size} is larger than the {len(train_ds)} training files '
                         f'(per patch grid: {_grid_counts(per_grid)}); lower it or add data')
    unused = {grid: n for grid, n in per_grid.items() if n < cfg.batch_size}
    if unused and env.is_main:  # batches never mix grids, so these files can never fill one
        _logger.warning('%d training files are never used: their patch grids (%s) have fewer files than '
                        '--batch-size %d', sum(unused.values()), _grid_counts(unused), cfg.batch_size)
    total = cfg.steps or (cfg.epochs or DEFAULT_EPOCHS) * per_epoch
    peak = cfg.lr or default_lr(cfg.batch_size)
    grid_size = default_input_size(patch) // patch
    initial = _read_initial_checkpoint(cfg.initial_checkpoint, data_backbone, embed_dim, grid_size)
    settings = dict(backbone=data_backbone, total_steps=total, batch_size=cfg.batch_size, lr=peak,
                    weight_decay=cfg.weight_decay, betas=list(cfg.betas), eps=cfg.eps, warmup_frac=cfg.warmup_frac,
                    min_lr=cfg.min_lr, val_frac=cfg.val_frac, seed=cfg.seed, amp=cfg.amp,
                    initial_checkpoint=initial[1] if initial else None)
    train_names = [it.path.name for it in train_items]
    val_names = [it.path.name for it in val_items]
    data_digest = _data_digest(scan.items)
    _check_ranks_agree([train_names, val_names, train_ds.grids, val_ds.grids, data_digest], env, 'stage-1 files')

    # Model, optimiser, schedule: seeded identically on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    module = Denoiser(embed_dim, grid_size).to(env.device)
    if initial is not None:
        module.load_state_dict(initial[0])
    optimizer = torch.optim.AdamW(module.parameters(), lr=peak, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total, peak, cfg.warmup_frac, cfg.min_lr) / peak)
    step, last_val, best = 0, None, None  # best: (held-out loss, step) of the weights in best/
    best_weights: Optional[Dict[str, torch.Tensor]] = None  # kept in the checkpoint, so --resume can restore best/
    skipped_when_read: Set[Path] = set()  # files that went bad after the scan (this process's batches)
    log = _JsonLog(out / LOG_NAME, env.is_main)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_resume(saved, settings, train_names, val_names, data_digest, ckpt_path)
        module.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        scheduler.load_state_dict(saved['scheduler'])
        step, last_val = int(saved['step']), saved.get('val_loss')
        best = tuple(saved['best']) if saved.get('best') else None
        best_weights = saved.get('best_weights')
        rngs = saved['rng']
        if len(rngs) != env.world_size and env.is_main:
            _logger.warning('resuming a %d-process run with %d processes: same data order, but not bit-exact',
                            len(rngs), env.world_size)
        _set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        log.truncate_after(step)
        # training_args.json stays the first invocation's; what this one changed (cadence, workers, device) is here.
        log(event='resume', step=step, world_size=env.world_size, device=str(env.device),
            args=asdict(cfg))
        if env.is_main:
            _logger.info('resumed %s at step %d of %d', ckpt_path, step, total)
    else:
        if env.is_main:  # left by a run killed before its first checkpoint: nothing of it survives
            log.path.unlink(missing_ok=True)
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        log(event='start', step=0, settings=settings, world_size=env.world_size, device=str(env.device),
            train_files=len(train_items), val_files=len(val_items),
            skipped=[{'file': p.name, 'reason': r} for p, r in scan.skipped])
        if env.is_main:
            atomic_write(out / ARGS_NAME, lambda p: Path(p).write_text(
                json.dumps({**asdict(cfg), 'resolved': settings}, indent=2, default=str) + '\n'))
    model = module
    if env.distributed:
        model = DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    denoiser_config = DenoiserConfig(backbone=data_backbone, embed_dim=embed_dim, num_heads=module.num_heads,
                                     grid_size=grid_size, patch_size=patch, input_size=_training_size(train_items))

    def save_checkpoint() -> None:
        # Checked here, not only at log steps: a non-finite checkpoint would replace the last good one.
        if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
            raise RuntimeError(f'the weights are not finite at step {step}, so the checkpoint of an earlier step '
                               'is kept: check the data (--verify-data rejects files holding NaN/Inf) or lower --lr')
        rngs = [_rng_state()]
        if env.distributed:  # every rank's RNG, so each resumes its own stream
            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, _rng_state())
        if env.is_main:
            state = dict(format=TRAIN_STATE_FORMAT, format_version=TRAIN_STATE_VERSION, step=step,
                         model=module.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), rng=rngs, settings=settings,
                         train_files=train_names, val_files=val_names, data_digest=data_digest, val_loss=last_val,
                         best=best, best_weights=best_weights, denoiser_config=denoiser_config.to_dict())
            atomic_write(ckpt_path, lambda p: torch.save(state, p))
            log(event='checkpoint', step=step)

    def held_out_loss(m: nn.Module) -> Optional[float]:
        if not len(val_ds):
            return None
        val_sampler.batches = eval_batches(val_ds.grids, cfg.batch_size // env.world_size, env.rank, env.world_size)
        return evaluate(m, val_loader, env, cfg.amp, skipped_when_read)

    def write_best() -> None:
        if env.is_main:
            _write_denoiser(out / BEST_DIR, best_weights, denoiser_config, settings, best[1], len(train_items),
                            len(val_items), best[0], identity_val)

    def validate() -> None:
        nonlocal last_val, best, best_weights
        last_val = held_out_loss(module)
        if last_val is None:
            return
        log(event='val', step=step, val_loss=last_val)
        # Every rank agrees (the loss is all-reduced); a NaN loss is never the best.
        if math.isfinite(last_val) and (best is None or last_val < best[0]):
            best = (last_val, step)
            if env.is_main:  # the rank that writes best/ and the checkpoint
                best_weights = {k: v.detach().to('cpu', copy=True) for k, v in module.state_dict().items()}
            write_best()

    train_sampler, val_sampler = _BatchList(), _BatchList()
    train_loader = _loader(train_ds, train_sampler, cfg.workers, env.device)
    val_loader = _loader(val_ds, val_sampler, cfg.workers, env.device)
    identity_val = held_out_loss(_Identity())  # recomputed on resume: the held-out files are fixed
    if identity_val is not None and not resume:
        log(event='baseline', step=0, identity_val_loss=identity_val)
    if resume and env.is_main:  # best/ as the checkpoint has it: a kill may have left it a later validation's
        if best_weights is not None:
            write_best()
        elif best is None:
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    if env.is_main:
        _logger.info('training a %s denoiser on %d files (%d held out, %d skipped): %d steps of %d, lr %.3g, %s x%d',
                     data_backbone, len(train_items), len(val_items), len(scan.skipped), total, cfg.batch_size,
                     peak, env.device, env.world_size)

    start_step = step
    module.train()
    bar = tqdm(total=total, initial=step, unit='step', disable=not env.is_main, dynamic_ncols=True)
    loss_sum = torch.zeros((), device=env.device)
    window_steps, window_start = 0, time.perf_counter()
    with logging_redirect_tqdm():
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            batches = global_batches(train_ds.grids, cfg.batch_size, cfg.seed, epoch)[offset:]
            train_sampler.batches = [rank_slice(b, env.rank, env.world_size) for b in batches]
            for raw, clean, usable in _noting_skips(train_loader, skipped_when_read):
                raw, clean = raw.to(env.device, non_blocking=True), clean.to(env.device, non_blocking=True)
                lr = scheduler.get_last_lr()[0]  # the rate this step uses
                loss_sum += train_step(model, optimizer, raw, clean, cfg.amp, usable.to(env.device))
                scheduler.step()
                step += 1
                window_steps += 1
                bar.update(1)
                if step % max(cfg.log_every, 1) == 0 or step == total:
                    # Ranks average their losses; .item() is the only host sync of the loop.
                    loss = (_all_reduce_sum(loss_sum, env) / (window_steps * env.world_size)).item()
                    elapsed = time.perf_counter() - window_start
                    if not math.isfinite(loss):
                        raise RuntimeError(f'training loss is {loss} at step {step}: check the data '
                                           '(--verify-data rejects files holding NaN/Inf) or lower --lr')
                    log(event='train', step=step, epoch=epoch, loss=loss, lr=lr,
                        samples_per_s=window_steps * cfg.batch_size / elapsed)
                    bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}',
                                    **({'val': f'{last_val:.4f}'} if last_val is not None else {}))
                    loss_sum.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                paused = time.perf_counter()  # validation and checkpoints stay out of the throughput
                if step < total and cfg.val_every and step % cfg.val_every == 0:
                    validate()
                if step < total and cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    save_checkpoint()
                window_start += time.perf_counter() - paused
                if cfg.stop_after_steps is not None and step == cfg.stop_after_steps:
                    os.kill(os.getpid(), signal.SIGKILL)  # testing: a hard kill, no clean-up of any kind
                if step >= total:
                    break
    bar.close()

    if start_step < total:
        validate()
        save_checkpoint()
    # The final model comes after the final checkpoint: a kill in between is repaired by --resume.
    best_val, best_step = best or (None, None)
    went_bad = _gather_paths(skipped_when_read, env)
    if env.is_main:
        _write_denoiser(out, module.state_dict(), denoiser_config, settings, step, len(train_items), len(val_items),
                        last_val, identity_val)
        log(event='done', step=step, val_loss=last_val, best_step=best_step,
            skipped_when_read=[p.name for p in went_bad])
        _logger.info('wrote %s (%s denoiser, %d steps, held-out loss %s; raw features as the prediction: %s)%s',
                     out, data_backbone, step, loss_text(last_val), loss_text(identity_val),
                     f'; {out / BEST_DIR}: step {best_step}, held-out loss {loss_text(best_val)}' if best else '')
    if env.distributed:
        dist.barrier()  # no process exits before the outputs exist
    return dict(out=str(out), steps=step, val_loss=last_val, identity_val_loss=identity_val, backbone=data_backbone,
                best_step=best_step, best_val_loss=best_val,
                train_files=len(train_items), val_files=len(val_items),
                skipped=[(str(p), r) for p, r in scan.skipped]
                + [(str(p), 'unreadable or non-finite when read: zero weight in its batches') for p in went_bad])


def _gather_paths(paths: Set[Path], env: DistEnv) -> List[Path]:
    """The union of every rank's `paths`, sorted."""
    if env.distributed:
        every = [None] * env.world_size
        dist.all_gather_object(every, sorted(paths))
        paths = set().union(*every)
    return sorted(paths)


def _training_size(items: Sequence[Stage1Item]) -> Optional[int]:
    """The side of the square images all training features came from; None when they mix sizes."""
    sizes = {it.input_size for it in items}
    if len(sizes) != 1:
        return None
    H, W = sizes.pop()
    return H if H == W else None


def _grid_counts(counts: Dict[Tuple[int, int], int]) -> str:
    """'8x8: 21, 6x10: 9' for files per patch grid."""
    return ', '.join(f'{h}x{w}: {n}' for (h, w), n in sorted(counts.items()))
