"""Stage 1: per-image neural-field decomposition of ViT features (DVT section 3)."""
