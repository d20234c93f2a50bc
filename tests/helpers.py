"""Test helpers: checkpoint files in the authors' exact format and a pre-populated Hugging Face cache."""
import shutil
from pathlib import Path
from typing import Dict

import torch

# The keys and shapes of an authors' denoiser file (../shared/REFERENCE.md section 2), for width C.
def authors_shapes(C: int, grid: int) -> Dict[str, tuple]:
    return {
        'denoiser.norm1.weight': (C,), 'denoiser.norm1.bias': (C,),
        'denoiser.attn.qkv.weight': (3 * C, C), 'denoiser.attn.qkv.bias': (3 * C,),
        'denoiser.attn.proj.weight': (C, C), 'denoiser.attn.proj.bias': (C,),
        'denoiser.norm2.weight': (C,), 'denoiser.norm2.bias': (C,),
        'denoiser.mlp.fc1.weight': (4 * C, C), 'denoiser.mlp.fc1.bias': (4 * C,),
        'denoiser.mlp.fc2.weight': (C, 4 * C), 'denoiser.mlp.fc2.bias': (C,),
        'pos_embed': (1, grid * grid, C),
    }


def write_authors_checkpoint(path: Path, C: int = 384, grid: int = 37, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Write a pickled fp32 dict `{"denoiser": {...}}` like the authors' files; returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in authors_shapes(C, grid).items():
        t = torch.randn(shape, generator=g)
        if key.endswith('norm1.weight') or key.endswith('norm2.weight'):
            t = 1 + 0.1 * t
        elif key == 'pos_embed':
            t = 0.02 * t
        else:
            t = t * (0.5 / shape[-1] ** 0.5 if len(shape) == 2 else 0.05)
        sd[key] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'denoiser': sd}, path)
    return sd


def populate_hf_cache(cache: Path, repo_id: str, files: Dict[str, Path], commit: str = 'a' * 40) -> None:
    """Lay files out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/<path>), so
    `hf_hub_download` finds them with HF_HUB_OFFLINE=1."""
    repo_dir = cache / f'models--{repo_id.replace("/", "--")}'
    (repo_dir / 'refs').mkdir(parents=True, exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(commit)
    for rel, src in files.items():
        dst = repo_dir / 'snapshots' / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
