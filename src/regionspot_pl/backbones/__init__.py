"""Frozen backbones: SAM (region tokens and masks) and CLIP (feature map, text embeddings)."""

from .clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEncoder,
    clean_class_name,
    clip_preprocess,
    load_clip,
    model_identity,
    text_embeddings,
)
from .sam import (
    OFFICIAL_SAM_CHECKPOINTS,
    SAM_TYPES,
    TINY_SAM_CONFIG,
    SamRegionEncoder,
    SamTransform,
    build_sam,
)
from .templates import TEMPLATES
from .tiny import write_tiny_backbones

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "OFFICIAL_SAM_CHECKPOINTS",
    "SAM_TYPES",
    "TEMPLATES",
    "TINY_SAM_CONFIG",
    "ClipEncoder",
    "SamRegionEncoder",
    "SamTransform",
    "build_sam",
    "clean_class_name",
    "clip_preprocess",
    "load_clip",
    "model_identity",
    "text_embeddings",
    "write_tiny_backbones",
]
