"""Frozen backbones: a promptable segmenter (SAM: region tokens, masks, IoUs) and a
vision-language model (CLIP, MetaCLIP 2, SigLIP: feature map, text embeddings), behind the interfaces of
:mod:`.interfaces`, combined by :class:`RegionEncoder` into the one encode path.

The names below are imported from their modules on first use: SAM and CLIP code (transformers)
loads only when a command needs the backbones, not when it reads their settings (``--help``).
"""

from importlib import import_module
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(
        ("CLIP_MEAN", "CLIP_STD", "ClipEncoder", "MetaClip2Encoder", "clip_preprocess", "load_clip"), "clip"
    ),
    **dict.fromkeys(("FrozenVisionLanguageModel", "clean_class_name", "square_preprocess"), "vlm"),
    "SiglipEncoder": "siglip",
    **dict.fromkeys(("model_identity", "text_embeddings"), "text_cache"),
    **dict.fromkeys(
        ("EncodedImage", "ImageFeatures", "ImageInput", "RegionEncoder", "RegionFeatures", "image_input"), "encoder"
    ),
    **dict.fromkeys(
        ("DecodedRegions", "PromptableSegmenter", "Prompts", "SegmenterTransform", "VisionLanguageModel"),
        "interfaces",
    ),
    **dict.fromkeys(("OFFICIAL_SAM_CHECKPOINTS", "SAM_TYPES", "TINY_SAM_CONFIG", "SamTransform", "build_sam"), "sam"),
    "SamSegmenter": "sam_segmenter",
    **dict.fromkeys(("OFFICIAL_SAM2_CHECKPOINTS", "SAM2_TYPES", "Sam2Transform", "build_sam2_model"), "sam2_model"),
    "Sam2Segmenter": "sam2_segmenter",
    **dict.fromkeys(("SEGMENTER_TYPES", "check_sam_type", "load_segmenter", "load_vlm"), "build"),
    "TEMPLATES": "templates",
    "write_tiny_backbones": "tiny",
    **dict.fromkeys(("write_tiny_metaclip2", "write_tiny_siglip"), "tiny_vlm"),
}  # fmt: skip

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
