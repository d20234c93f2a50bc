"""Fetching denoisers from the Hugging Face Hub (through huggingface_hub's cache, so offline use works)."""
from pathlib import Path
from typing import Optional, Tuple

from huggingface_hub import hf_hub_download

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME

__all__ = ['split_repo_revision', 'fetch_denoiser']


def split_repo_revision(repo_id: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """timm's `user/repo@revision` spelling -> (repo, revision)."""
    if '@' in repo_id:
        repo_id, rev = repo_id.split('@', 1)
        revision = revision or rev
    return repo_id, revision


def fetch_denoiser(
        repo_id: str,
        filename: Optional[str] = None,
        revision: Optional[str] = None,
        **hf_kwargs,
) -> Path:
    """Download (or find in the cache) a denoiser and return a path `read_denoiser_checkpoint` accepts.

    With `filename`, one file of the repo (e.g. an authors' `voc_denoised/<model>.pth`); without, a repo
    in our format, whose `config.json` and `model.safetensors` land in one snapshot directory.
    """
    repo_id, revision = split_repo_revision(repo_id, revision)
    if filename:
        return Path(hf_hub_download(repo_id, filename, revision=revision, **hf_kwargs))
    hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **hf_kwargs)
    return Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, **hf_kwargs)).parent
