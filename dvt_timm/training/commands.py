"""The `train-denoiser` and `average-denoisers` commands: argparse wiring for `dvt_timm.training`.

`add_train_denoiser_parser(subparsers)` registers the subcommand on the `dvt-timm` CLI;
`python -m dvt_timm.training ...` (and `torchrun ... -m dvt_timm.training ...`) runs the same command.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..cli import output_folder
from .trainer import BEST_DIR, DEFAULT_EPOCHS, TrainConfig, loss_text, train

__all__ = ['add_train_denoiser_arguments', 'add_train_denoiser_parser', 'add_average_denoisers_parser',
           'config_from_args', 'run_train_denoiser', 'main']

_DESCRIPTION = """\
Train DVT's generalizable denoiser (stage 2) on a folder of stage-1 outputs.

Defaults are the authors': AdamW, betas (0.9, 0.999), weight decay 1e-5, peak lr 2e-4*sqrt(batch/256),
cosine schedule with 15% linear warm-up down to 1e-6, global batch 64, no augmentation. Writes to --out:
config.json + model.safetensors (the denoiser in dvt-timm format) and README.md at the end;
best/ (the same three files, from the validation with the lowest held-out loss so far);
checkpoint.pt (training state, every --ckpt-every steps), log.jsonl and training_args.json (the first
invocation's arguments; each --resume logs its own in log.jsonl).

Several processes: torchrun --nproc_per_node N -m dvt_timm.training --data ... (gloo on the CPU, NCCL on
GPUs); --batch-size stays the global batch and the result matches a one-process run.
"""


def add_train_denoiser_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `train-denoiser` flags to a parser."""
    p.add_argument('--data', required=True, help='folder of stage-1 <image>.safetensors files')
    p.add_argument('--model', required=True,
                   help='backbone timm id or dvt_* name; must be the backbone the stage-1 features came from')
    p.add_argument('--out', required=True, type=output_folder, help='output folder (checkpoint, log, final denoiser)')
    length = p.add_mutually_exclusive_group()
    length.add_argument('--epochs', type=int, default=None,
                        help=f'passes over the training files (default {DEFAULT_EPOCHS})')
    length.add_argument('--steps', type=int, default=None, help='optimiser steps (instead of --epochs)')
    p.add_argument('--batch-size', type=int, default=64, help='global batch, split evenly over processes (default 64)')
    p.add_argument('--lr', type=float, default=None, help='peak learning rate (default 2e-4*sqrt(batch/256))')
    p.add_argument('--weight-decay', type=float, default=1e-5, help='AdamW weight decay (default 1e-5)')
    p.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.999), metavar=('B1', 'B2'),
                   help='AdamW betas (default 0.9 0.999)')
    p.add_argument('--eps', type=float, default=1e-8, help='AdamW epsilon (default 1e-8)')
    p.add_argument('--warmup-frac', type=float, default=0.15, help='fraction of steps of linear warm-up (default 0.15)')
    p.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end of the cosine (default 1e-6)')
    p.add_argument('--val-frac', type=float, default=0.05,
                   help='fraction of images held out for validation (all their files: views, sizes), chosen by '
                        '--seed (default 0.05; 0: none)')
    p.add_argument('--val-every', type=int, default=500,
                   help='validate every N steps and at the end (default 500; 0: end only)')
    p.add_argument('--ckpt-every', type=int, default=500,
                   help='write checkpoint.pt every N steps and at the end (default 500; 0: end only)')
    p.add_argument('--log-every', type=int, default=10, help='log the training loss every N steps (default 10)')
    p.add_argument('--seed', type=int, default=0, help='seed of the initialisation, the split and the data order')
    p.add_argument('--workers', type=int, default=2, help='data-loading worker processes per process (default 2)')
    p.add_argument('--device', default=None, help='cpu, cuda (default: cuda when available)')
    p.add_argument('--amp', action='store_true',
                   help='bf16 autocast: about 2x faster on GPUs from Ampere on and on CPUs with AVX512-BF16 or AMX, '
                        'slower on CPUs without bf16 units')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --out from its checkpoint.pt (starts a new run if there is none)')
    p.add_argument('--verify-data', action='store_true',
                   help='read every stage-1 file in full when scanning and leave out those holding NaN/Inf '
                        '(without it, such a file is skipped with a warning when read: zero weight in its batches)')
    p.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                   help='start from this denoiser (a dvt-timm checkpoint folder or model.safetensors, or an authors\' '
                        '.pth) instead of random weights, to fine-tune it on --data')
    p.add_argument('--stop-after-steps', type=int, default=None, metavar='N',
                   help='testing: kill this process (SIGKILL) right after step N, to exercise --resume')


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data, model=args.model, out=args.out, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
        eps=args.eps, warmup_frac=args.warmup_frac, min_lr=args.min_lr, val_frac=args.val_frac,
        val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed,
        workers=args.workers, device=args.device, amp=args.amp, resume=args.resume, verify_data=args.verify_data,
        initial_checkpoint=args.initial_checkpoint, stop_after_steps=args.stop_after_steps)


def run_train_denoiser(args: argparse.Namespace) -> None:
    """Entry point of the subcommand (`func` of its parser)."""
    summary = train(config_from_args(args))
    if int(os.environ.get('RANK', '0')) == 0:
        val, identity = loss_text(summary['val_loss']), loss_text(summary['identity_val_loss'])
        print(f'wrote {summary["out"]} ({summary["backbone"]} denoiser, {summary["steps"]} steps, held-out loss {val} '
              f'(raw features as the prediction: {identity}), {len(summary["skipped"])} files skipped)')
        if summary['best_step'] is not None:
            print(f'wrote {Path(summary["out"]) / BEST_DIR} (the lowest held-out loss, '
                  f'{loss_text(summary["best_val_loss"])}, at step {summary["best_step"]})')


def add_train_denoiser_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train-denoiser` on a subparsers object, with `func=run_train_denoiser`."""
    p = subparsers.add_parser('train-denoiser', help='train the generalizable denoiser on stage-1 outputs (stage 2)',
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_denoiser_arguments(p)
    p.set_defaults(func=run_train_denoiser)
    return p


def _average_denoisers(args: argparse.Namespace) -> None:
    from .averaging import write_average
    config = write_average(args.denoisers, args.out, args.weights, args.overwrite)
    print(f'wrote {args.out} (the weighted mean of {len(args.denoisers)} denoisers for {config.backbone})')


def add_average_denoisers_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `average-denoisers` on a subparsers object."""
    p = subparsers.add_parser('average-denoisers',
                              help='the weighted mean of denoisers of one backbone (e.g. before and after a fine-tune)',
                              description='Average the weights of denoisers of one backbone and shape, like timm\'s '
                                          'avg_checkpoints.py; writes config.json, model.safetensors and a model '
                                          'card naming each source by its SHA-256.')
    p.add_argument('denoisers', nargs='+', help='dvt-timm checkpoint folders or model.safetensors, or authors\' .pth')
    p.add_argument('--out', required=True, type=output_folder, help='output folder')
    p.add_argument('--weights', type=float, nargs='+', default=None,
                   help='one weight per denoiser, summing to 1 (default: equal weights)')
    p.add_argument('--overwrite', action='store_true', help='replace a denoiser already in --out')
    p.set_defaults(func=_average_denoisers)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m dvt_timm.training ARGS` (the torchrun entry point) is `dvt-timm train-denoiser ARGS`."""
    from ..cli import main as cli_main
    return cli_main(['train-denoiser', *(sys.argv[1:] if argv is None else argv)])
