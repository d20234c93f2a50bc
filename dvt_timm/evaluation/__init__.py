"""Seeing and measuring DVT's artifacts: label-free artifact metrics, dense evaluation protocols (kNN
segmentation, linear probe, LOST-style object discovery) on raw vs denoised features, and the
`dvt-timm evaluate` / `dvt-timm visualize` commands. See docs/evaluation.md.
"""
from .features import FeatureSet, extract_features, load_stage1, zero_input_map
from .knn import knn_segmentation
from .labels import IGNORE, LabeledFolder, detect_label_format, find_label_pairs, read_label, voc_colormap
from .linear_probe import linear_probe
from .lost import boxes_from_label, connected_components, lost_box, lost_discovery, read_boxes
from .metrics import artifact_metrics, high_norm_stats, mic, positional_mic, variance_share, zero_input_cosine
from .scores import ConfusionMatrix, bootstrap_miou, box_iou, corloc, miou

__all__ = [
    'FeatureSet', 'extract_features', 'load_stage1', 'zero_input_map',
    'IGNORE', 'LabeledFolder', 'detect_label_format', 'find_label_pairs', 'read_label', 'voc_colormap',
    'artifact_metrics', 'variance_share', 'zero_input_cosine', 'mic', 'positional_mic', 'high_norm_stats',
    'knn_segmentation', 'linear_probe', 'lost_box', 'lost_discovery', 'boxes_from_label', 'connected_components',
    'read_boxes', 'ConfusionMatrix', 'miou', 'bootstrap_miou', 'box_iou', 'corloc',
]
