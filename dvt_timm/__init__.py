"""dvt-timm: Denoising Vision Transformers (DVT) as a timm plug-in.

`import dvt_timm` registers the `dvt_*` models with timm.
"""
from .checkpoint import CheckpointError, DenoiserConfig
from .denoiser import Denoiser
from .model import DenoisedViT
from . import registry  # registers the dvt_* models with timm

__version__ = '0.1.0'

__all__ = ['DenoisedViT', 'Denoiser', 'DenoiserConfig', 'CheckpointError', '__version__']
