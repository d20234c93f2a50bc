"""The `dvt-timm` command line."""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ['main', 'positive_int', 'positive_float']


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a number above 0, got {text}')
    return value


def output_folder(text: str) -> str:
    """argparse type: a folder to write into, existing or not yet made, with no file in the way and
    permission to write (checked now, not after the first results are computed)."""
    for path in (Path(text), *Path(text).parents):
        if path.exists():
            if not path.is_dir():
                raise argparse.ArgumentTypeError(f'{path} is a file, not a folder' if path == Path(text) else
                                                 f'cannot make a folder in {path}: it is a file')
            if not os.access(path, os.W_OK | os.X_OK):
                raise argparse.ArgumentTypeError(f'no permission to write in {path}')
            break
    return text


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import CARD_NAME, refuse_to_replace, with_default_tag
    from .model import DenoisedViT
    from .registry import resolve_backbone
    out = Path(args.out_dir)
    refuse_to_replace(out, args.overwrite)
    # config.json names the weights with their tag, which stays right if timm's default tag changes
    model = DenoisedViT(with_default_tag(resolve_backbone(args.model)), denoiser_checkpoint=args.src)
    if args.overwrite:
        (out / CARD_NAME).unlink(missing_ok=True)  # the old card describes the denoiser being replaced
    model.save_pretrained(out)
    print(f'wrote {args.out_dir} (denoiser for {model.backbone_name})')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='dvt-timm', description='Denoising Vision Transformers for timm models.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug messages')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('convert', help="convert an authors' denoiser .pth to our format "
                                       "(config.json, model.safetensors, README.md)")
    p.add_argument('src', help="authors' denoiser file, e.g. vit_base_patch14_dinov2.lvd142m.pth")
    p.add_argument('out_dir', type=output_folder, help='output directory')
    p.add_argument('--model', required=True, help='backbone timm id or dvt_* model name the denoiser belongs to')
    p.add_argument('--overwrite', action='store_true', help='replace a denoiser already in out_dir')
    p.set_defaults(func=_convert)

    from .evaluation.commands import add_evaluate_parser, add_visualize_parser
    from .fields.commands import add_denoise_images_parser
    from .training.commands import add_average_denoisers_parser, add_train_denoiser_parser
    add_visualize_parser(sub)
    add_evaluate_parser(sub)
    add_denoise_images_parser(sub)
    add_train_denoiser_parser(sub)
    add_average_denoisers_parser(sub)
    for command in sub.choices.values():  # `-v` after the command name too; SUPPRESS keeps an earlier one
        command.add_argument('-v', '--verbose', action='store_true', default=argparse.SUPPRESS,
                             help='log debug messages')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format='%(levelname)s %(message)s')
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f'dvt-timm {args.command}: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every long command writes atomically, so finished work is kept
        print(f'dvt-timm {args.command}: interrupted; finished outputs are kept, run it again to resume',
              file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
