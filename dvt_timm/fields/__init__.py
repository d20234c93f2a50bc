"""Stage 1: per-image neural-field decomposition of ViT features (DVT section 3).

`denoise_image` / `denoise_images` split each image's features into clean semantics F (a hash-grid
neural field over image coordinates), a positional artifact G shared by all views, and a residual Δ.
"""
from .decomposition import PRESETS, Decomposition, FieldSettings, decompose, image_seed, sample_indices
from .encoding import HashGridConfig, MultiHashGrid
from .pipeline import denoise_image, denoise_images, extract_view_features, image_view_features
from .views import View, render_views, sample_views, view_coords

__all__ = [
    'PRESETS', 'Decomposition', 'FieldSettings', 'HashGridConfig', 'MultiHashGrid', 'View', 'decompose',
    'denoise_image', 'denoise_images', 'extract_view_features', 'image_seed', 'image_view_features', 'render_views',
    'sample_indices', 'sample_views', 'view_coords',
]
