"""Frozen SigLIP (Hugging Face ``SiglipModel``, model_type 'siglip'): SigLIP and the
fixed-resolution SigLIP 2 checkpoints, which share its architecture.

SigLIP's vision tower has no class token: its global feature is the attention-pooled
``pooler_output`` (the image embedding SigLIP is trained with), which goes first in the feature
map, in the class token's place. Its text tower pools the LAST position and was trained on
prompts padded to its full length without an attention mask, so prompts are encoded that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from transformers import SiglipModel

from .common import BackboneError
from .vlm import FrozenVisionLanguageModel


class SiglipEncoder(FrozenVisionLanguageModel):
    """Frozen SigLIP as a :class:`~regionspot_pl.backbones.interfaces.VisionLanguageModel`.

    Feature map: ``[pooler_output, last_hidden_state]`` of the vision tower, [B, 1 + grid^2,
    vision_dim]; ``last_hidden_state`` is SigLIP's as the model returns it (after its post layer
    norm, which its pooling head reads). ``text_dim`` is the text tower's ``projection_size``
    (the vision width in the released models, so both embeddings share one space). The model's
    ``logit_bias`` is not used: the head's softmax over classes takes the logit scale only, and a
    bias common to all classes does not change a softmax.
    """

    family = "siglip"
    name = "SigLIP"
    example = "google/siglip-base-patch16-224"
    model_class = SiglipModel

    def __init__(
        self,
        model: SiglipModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if not model.config.vision_config.vision_use_head:
            raise BackboneError(
                "this SigLIP has no attention-pooling head (vision_config.vision_use_head is false), so its "
                "feature map would have no global token; use a SigLIP checkpoint with its pooling head"
            )
        super().__init__(model, tokenizer, mean, std)

    @staticmethod
    def joint_dim(config: transformers.PretrainedConfig) -> int:
        return int(config.text_config.projection_size)

    def _feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=pixel_values)
        return torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # padding="max_length" to the text tower's length and no attention mask: how SigLIP was
        # trained (its text tower pools the last position, a padding token for short prompts)
        max_length = int(self.model.config.text_config.max_position_embeddings)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"]}
