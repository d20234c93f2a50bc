"""`dvt-timm denoise-images`: stage 1 over an image folder or list file."""
import argparse
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import backbone_weights_id
from ..cli import output_folder, positive_float, positive_int
from ..data import list_images
from .decomposition import PRESETS
from .encoding import check_backend
from .folder import denoise_folder, rank_world, visuals_dir
from .pipeline import resolve_settings

__all__ = ['add_denoise_images_parser']

_logger = logging.getLogger(__name__)


def _device(requested: Optional[str]) -> Optional[torch.device]:
    """One GPU per process: cuda:LOCAL_RANK by default and for a bare `--device cuda` (modulo the visible
    GPUs, for schedulers that show each task only its own), made current, since our Triton kernels launch
    on the current device. None (the CPU) without CUDA."""
    device = torch.device(requested) if requested else None
    bare_cuda = device is not None and device.type == 'cuda' and device.index is None
    if bare_cuda or device is None and torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)) % max(torch.cuda.device_count(), 1))
    if device is not None and device.type == 'cuda':
        torch.cuda.set_device(device)
    return device


def _run(args: argparse.Namespace) -> None:
    from ..registry import load_model
    visual_pngs = visuals_dir(Path(args.out)).resolve()
    images = [p for p in list_images(args.images) if visual_pngs not in p.resolve().parents]  # our own PNGs
    if not images:
        raise ValueError(f'no images found in {args.images}')
    overrides = dict(n_views=args.views, iterations=args.iterations, samples_per_step=args.samples_per_step,
                     full_view_share=args.full_view_share, lr=args.lr, image_size=args.image_size, seed=args.seed,
                     amp=args.amp, sparse_table_adam=args.sparse_table_adam)
    settings = PRESETS[args.preset].with_overrides(**overrides)  # a bad value fails before the model loads
    device = _device(args.device)
    check_backend(args.backend, device or torch.device('cpu'))
    model = load_model(args.model, args.backbone_checkpoint, need_denoiser=False)
    settings = resolve_settings(settings, model.patch_size, device)  # amp, if unset, for this device
    if args.tf32:  # the MLPs' fp32 matmuls are most of a paper-settings step's arithmetic (docs/stage1.md)
        torch.set_float32_matmul_precision('high')
    on_cpu = device is None or device.type == 'cpu'
    if on_cpu and args.preset == 'paper' and args.views is None and args.iterations is None:
        _logger.warning('the paper preset (%d views, %d steps) is meant for a GPU; on a CPU use --preset fast',
                        settings.n_views, settings.iterations)
    # outputs record which weights made them, so that a re-run with others does not mix its results in
    weights = backbone_weights_id(args.backbone_checkpoint)
    visuals = None
    if args.save_visuals:
        from .visuals import save_stage1_visuals
        visuals = save_stage1_visuals
    summary = denoise_folder(
        model, images, Path(args.out), settings, model.backbone_name, batch_images=args.batch_images,
        dtype=torch.float16 if args.dtype == 'fp16' else torch.float32, device=device, backend=args.backend,
        visuals=visuals, backbone_weights=weights, save_views=args.save_views)
    print(f'stage 1: {summary}')
    for failure in summary.failed:
        print(f'  failed: {failure}')
    if summary.failed and not (summary.done or summary.skipped):
        if rank_world()[1] > 1:  # an error would make torchrun stop the other ranks
            _logger.warning('none of the %d images of this rank could be processed', len(summary.failed))
        else:  # so that scripts can tell
            raise RuntimeError(f'none of the {len(summary.failed)} images could be processed')


def add_denoise_images_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        'denoise-images', help='stage 1: per-image neural-field denoising of a folder of images',
        description='Decompose each image\'s ViT features into clean semantics F, a shared positional artifact '
                    'G and a residual, writing <stem>.safetensors (raw, denoised) per image. Re-running skips '
                    'finished images; under torchrun each rank takes its share.')
    p.add_argument('--model', required=True, help='backbone timm id or dvt_* model name')
    p.add_argument('--backbone-checkpoint', help='timm-layout backbone weights (default: timm pretrained)')
    p.add_argument('--images', required=True,
                   help='image folder, one image, or text file listing image paths (relative to the list\'s folder)')
    p.add_argument('--out', required=True, type=output_folder, help='output folder')
    p.add_argument('--preset', choices=sorted(PRESETS), default='paper',
                   help="'paper' (default): the paper's settings, for a GPU; 'fast': the CPU preset "
                        "(see docs/stage1.md)")
    p.add_argument('--save-visuals', action='store_true', help='also write OUT/visuals/<stem>.png per image: '
                   'image, PCA of raw, PCA of F, G, |Δ|')
    p.add_argument('--save-views', action='store_true',
                   help='also write every view\'s (raw, F at the view\'s coordinates) pair to '
                        'OUT/views/<stem>_viewNNN.safetensors (000: the full image), a stage-1 folder for '
                        'train-denoiser --data OUT/views with views+1 training pairs per image '
                        '(fast preset: 37 files of 1.5 MB per ViT-S image)')
    g = p.add_argument_group('settings (override the preset)')
    g.add_argument('--views', type=int, help='random views per image (plus the full image)')
    g.add_argument('--iterations', type=int, help='optimisation steps per image group')
    g.add_argument('--samples-per-step', type=int, help='patch samples per image and step, from all its views')
    g.add_argument('--full-view-share', type=float,
                   help="share of each step's samples taken from the full view "
                   f"(paper: {PRESETS['paper'].full_view_share}; fast: {PRESETS['fast'].full_view_share})")
    g.add_argument('--lr', type=positive_float, help='Adam learning rate of the fields')
    g.add_argument('--image-size', type=int, help='squash-resize side (multiple of the patch size)')
    g.add_argument('--seed', type=int, help='run seed; each image draws its views and samples from it and its stem')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for feature extraction (default: on where the device computes in bf16 natively: '
                        'GPUs from Ampere on, CPUs with AVX512-BF16 or AMX)')
    g.add_argument('--sparse-table-adam', action=argparse.BooleanOptionalAction, default=None,
                   help="Adam skips hash-table values a step gave no gradient, as tiny-cuda-nn's Adam does "
                        "(default: on for --preset paper, off for fast; off steps the whole table, as the "
                        "authors' code does)")
    r = p.add_argument_group('run')
    r.add_argument('--batch-images', type=positive_int, default=4, help='images optimised together (default: 4)')
    r.add_argument('--dtype', choices=('fp16', 'fp32'), default='fp16', help='stored feature precision (default: fp16)')
    r.add_argument('--device', help='default: cuda:LOCAL_RANK when available, else cpu')
    r.add_argument('--backend', choices=('auto', 'torch', 'triton', 'tcnn'), default='auto',
                   help='hash-grid encoding backend')
    r.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: fp32 matmuls (the fields' MLPs, and the backbone's with --no-amp) on TF32 "
                        "tensor cores, torch.set_float32_matmul_precision('high') (default: on)")
    p.set_defaults(func=_run)
