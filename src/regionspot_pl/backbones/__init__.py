"""Frozen backbones: a promptable segmenter (SAM: region tokens, masks, IoUs) and a
vision-language model (CLIP: feature map, text embeddings), behind the interfaces of
:mod:`.interfaces`, combined by :class:`RegionEncoder` into the one encode path."""

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
from .encoder import EncodedImage, ImageFeatures, ImageInput, RegionEncoder, RegionFeatures, image_input
from .interfaces import DecodedRegions, PromptableSegmenter, Prompts, SegmenterTransform, VisionLanguageModel
from .sam import (
    OFFICIAL_SAM_CHECKPOINTS,
    SAM_TYPES,
    TINY_SAM_CONFIG,
    SamTransform,
    build_sam,
)
from .sam_segmenter import SamSegmenter
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
    "DecodedRegions",
    "EncodedImage",
    "ImageFeatures",
    "ImageInput",
    "PromptableSegmenter",
    "Prompts",
    "RegionEncoder",
    "RegionFeatures",
    "SamSegmenter",
    "SamTransform",
    "SegmenterTransform",
    "VisionLanguageModel",
    "build_sam",
    "clean_class_name",
    "clip_preprocess",
    "image_input",
    "load_clip",
    "model_identity",
    "text_embeddings",
    "write_tiny_backbones",
]
