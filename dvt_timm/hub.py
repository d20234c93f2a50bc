"""Denoisers on the Hugging Face Hub: fetching them (through huggingface_hub's cache, so offline use works)
and publishing a trained one."""
import os
from pathlib import Path
from typing import Optional, Tuple, Union

from huggingface_hub import HfApi, hf_hub_download

from .checkpoint import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, read_denoiser_checkpoint

__all__ = ['split_repo_revision', 'fetch_denoiser', 'upload_denoiser']


def split_repo_revision(repo_id: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """timm's `user/repo@revision` spelling -> (repo, revision); a different `revision` as well is an error."""
    if '@' in repo_id:
        repo_id, rev = repo_id.split('@', 1)
        if revision is not None and revision != rev:
            raise ValueError(f'two revisions for {repo_id}: @{rev} in the name and revision={revision!r}')
        revision = rev
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


def upload_denoiser(folder: Union[str, os.PathLike], repo_id: str, private: Optional[bool] = None,
                    **hf_kwargs) -> str:
    """Publish a denoiser folder in our format (e.g. `dvt-timm train-denoiser --out`) to a Hub model repo:
    `config.json`, `model.safetensors` and its model card `README.md` with the training table, not the
    training state (`checkpoint.pt`, logs). Returns the commit URL."""
    folder = Path(folder)
    read_denoiser_checkpoint(folder)  # a folder that does not load is not uploaded
    api = HfApi(**hf_kwargs)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message='Upload DVT denoiser',
                                 allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
