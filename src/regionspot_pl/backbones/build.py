"""The builders of the frozen pair: a ``--sam_type`` and its checkpoint -> a
:class:`~.interfaces.PromptableSegmenter`; a model folder -> a
:class:`~.interfaces.VisionLanguageModel`, chosen by the ``model_type`` in its ``config.json``.

Every command builds its backbones here, so a new localization or vision-language family is
added in one place: its module, and one entry below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils.checks import SettingError
from .common import BackboneError, BackboneNotFoundError
from .interfaces import PromptableSegmenter, VisionLanguageModel
from .sam import OFFICIAL_SAM_CHECKPOINTS, SAM_TYPES
from .sam2_model import OFFICIAL_SAM2_CHECKPOINTS, SAM2_TYPES, is_sam2_type

# The named --sam_type values: segment-anything's SAMs, then the packaged SAM 2.1 models; a path
# ending in .yaml (a SAM 2 model config) is accepted besides.
SEGMENTER_TYPES = SAM_TYPES + SAM2_TYPES
SEGMENTER_CHOICES = f"{', '.join(SEGMENTER_TYPES)}, or the path of a SAM 2 model config .yaml"


def check_sam_type(value: str) -> None:
    """Refuse a ``--sam_type`` that names no segmenter (a :class:`SettingError` of ``sam_type``)."""
    if not isinstance(value, str) or not (value in SAM_TYPES or is_sam2_type(value)):
        raise SettingError("sam_type", f"is {value!r}; expected one of: {SEGMENTER_CHOICES}")


def segmenter_name(sam_type: str) -> str:
    """The name a ``--sam_type`` is recorded under (manifests, heads): the type itself, or a SAM 2
    config's file name, so that the same model named from two folders is one segmenter."""
    return Path(sam_type).name


def official_checkpoint(sam_type: str) -> str | None:
    """The released checkpoint file of a named ``sam_type`` (None for a config YAML)."""
    return {**OFFICIAL_SAM_CHECKPOINTS, **OFFICIAL_SAM2_CHECKPOINTS}.get(sam_type)


def load_segmenter(sam_type: str, checkpoint: str | Path | None) -> PromptableSegmenter:
    """The frozen promptable segmenter of ``sam_type`` with the weights of ``checkpoint``: a SAM
    for segment-anything's types, a SAM 2 for the SAM 2.1 names and SAM 2 config YAMLs."""
    if sam_type in SAM_TYPES:
        from .sam import build_sam
        from .sam_segmenter import SamSegmenter

        return SamSegmenter(build_sam(sam_type, checkpoint))
    if is_sam2_type(sam_type):
        from .sam2_model import build_sam2_model
        from .sam2_segmenter import Sam2Segmenter

        return Sam2Segmenter(build_sam2_model(sam_type, checkpoint))
    raise BackboneError(f"unknown --sam_type {sam_type!r}; choose one of {SEGMENTER_CHOICES}")


# config.json's model_type -> (module, class) of the VisionLanguageModel that reads the folder
VLM_FAMILIES = {
    "clip": ("clip", "ClipEncoder"),  # OpenAI CLIP, MetaCLIP 1, any CLIPModel
    "metaclip_2": ("clip", "MetaClip2Encoder"),
    "siglip": ("siglip", "SiglipEncoder"),  # SigLIP and the fixed-resolution SigLIP 2
}
# model_types refused with the reason and what to use instead (docs/fidelity.md)
REFUSED_VLM_FAMILIES = {
    "siglip2": "a NaFlex SigLIP 2 (Siglip2Model) takes patchified inputs of a variable number of patches with an "
    "attention mask and their spatial shapes, not the fixed square grid of tokens the feature cache holds; use a "
    "fixed-resolution SigLIP 2 checkpoint (SiglipModel, model_type 'siglip', e.g. google/siglip2-base-patch16-224)",
}


def load_vlm(model_dir: str | Path) -> VisionLanguageModel:
    """The frozen vision-language model saved in the local folder ``model_dir``, of the family
    its config.json's ``model_type`` names (``VLM_FAMILIES``)."""
    from importlib import import_module

    from .common import BackboneError
    from .vlm import read_model_type

    model_type = read_model_type(model_dir)
    if model_type in REFUSED_VLM_FAMILIES:
        raise BackboneError(f"{str(model_dir)!r} (model_type {model_type!r}): {REFUSED_VLM_FAMILIES[model_type]}")
    if model_type not in VLM_FAMILIES:
        found = "config.json missing" if model_type is None else f"config.json has model_type {model_type!r}"
        raise BackboneError(
            f"{str(model_dir)!r} is not a CLIP directory of a supported family: {found}; supported model_types: "
            f"{', '.join(map(repr, VLM_FAMILIES))} (a Hugging Face snapshot saved with save_pretrained)"
        )
    module, name = VLM_FAMILIES[model_type]
    return getattr(import_module(f".{module}", __package__), name).from_folder(model_dir)


class LazyTextEncoder:
    """Stands in for a vision-language model in :func:`~.clip.text_embeddings`: the model is
    loaded only on a cache miss, so a run whose vocabulary is cached needs no model folder at all."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu") -> None:
        self.model_dir, self.device = Path(model_dir), device
        self._encoder: VisionLanguageModel | None = None

    def encode_texts(self, *args, **kwargs) -> torch.Tensor:
        if self._encoder is None:
            if not self.model_dir.is_dir():
                raise BackboneNotFoundError(
                    f"this vocabulary is not in the text cache, and the CLIP folder {self.model_dir} that would "
                    "compute it is missing: pass --clip_model DIR"
                )
            self._encoder = load_vlm(self.model_dir).to(self.device)
        return self._encoder.encode_texts(*args, **kwargs)
