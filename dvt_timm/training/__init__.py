"""Stage 2 of DVT: training the generalizable denoiser on stage-1 outputs."""
from .data import Stage1Dataset, Stage1Error, scan_stage1
from .trainer import TrainConfig, default_lr, lr_at, train

__all__ = ['TrainConfig', 'train', 'default_lr', 'lr_at', 'Stage1Dataset', 'Stage1Error', 'scan_stage1']
