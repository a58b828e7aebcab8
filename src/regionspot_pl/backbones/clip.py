"""Frozen CLIP-shaped models (Hugging Face transformers): OpenAI CLIP, MetaCLIP 1 and any other
``CLIPModel`` (model_type 'clip'), and MetaCLIP 2 (``MetaClip2Model``, model_type 'metaclip_2').

RegionSpot's key/value tokens are CLIP's vision ``last_hidden_state`` for the whole image resized
to a square (class token first, before the post layer norm); its classifier weights are the
template-averaged, L2-normalized text embeddings of the class names. MetaCLIP 2 is CLIP's
architecture with an XLM-R tokenizer: the same feature map, the same text path. The shared
machinery is :mod:`.vlm`; the text cache is :mod:`.text_cache` (its names are re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import CLIPModel, MetaClip2Model

from .text_cache import PROMPT_PROTOCOL, model_identity, text_embeddings
from .vlm import FrozenVisionLanguageModel, Normalisation, clean_class_name, load_hf_folder, square_preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_EXAMPLE = "openai/clip-vit-base-patch16"


def load_clip(model_dir: str | Path) -> tuple[CLIPModel, transformers.PreTrainedTokenizerBase]:
    """Load a CLIP model + tokenizer saved with ``save_pretrained`` from a local directory.

    Offline only (``local_files_only=True``). The model is returned in eval mode and frozen.
    """
    return load_hf_folder(model_dir, "clip", CLIPModel, "CLIP", _CLIP_EXAMPLE)


def clip_preprocess(
    image: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """[3, H, W] uint8 (or float in [0, 1]) -> [3, size, size] normalized float32:
    ``square_preprocess`` (square, bilinear, no antialiasing), CLIP's mean and std by default."""
    return square_preprocess(image, size, mean, std)


class ClipEncoder(FrozenVisionLanguageModel):
    """Frozen Hugging Face CLIP as a :class:`~regionspot_pl.backbones.interfaces.VisionLanguageModel`.

    The feature map is the vision tower's ``last_hidden_state``, class token first, before the
    post layer norm; text prompts are padded to the longest of their batch with an attention
    mask (CLIP's causal text tower pools at the first end-of-text token, so the padding after
    it changes nothing). ``vision_dim`` 768 / ``text_dim`` 512 for ViT-B/16, 1024 / 768 for
    ViT-L/14. Pixels are normalised with the folder's preprocessor_config.json, CLIP's own
    constants where the folder has none (the OpenAI snapshots state exactly these).
    """

    family = "clip"
    name = "CLIP"
    example = _CLIP_EXAMPLE
    model_class = CLIPModel
    default_normalisation: Normalisation = (CLIP_MEAN, CLIP_STD)

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        super().__init__(model, tokenizer, mean, std)

    @staticmethod
    def joint_dim(config: transformers.PretrainedConfig) -> int:
        return int(config.projection_dim)

    def _feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=int(self.model.config.text_config.max_position_embeddings),
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class MetaClip2Encoder(ClipEncoder):
    """Frozen MetaCLIP 2 (``MetaClip2Model``): CLIP's architecture, feature map and text path
    with an XLM-R tokenizer (its text tower pools at the first ``eos_token_id``, 2 in the released
    weights). The folder must state its normalisation (preprocessor_config.json)."""

    family = "metaclip_2"
    name = "MetaCLIP 2"
    example = "facebook/metaclip-2-worldwide-huge-quickgelu"
    model_class = MetaClip2Model
    default_normalisation = None


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PROMPT_PROTOCOL",
    "ClipEncoder",
    "MetaClip2Encoder",
    "clean_class_name",
    "clip_preprocess",
    "load_clip",
    "model_identity",
    "text_embeddings",
]
