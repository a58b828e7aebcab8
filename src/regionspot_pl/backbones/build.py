"""The builders of the frozen pair: a ``--sam_type`` and its checkpoint -> a
:class:`~.interfaces.PromptableSegmenter`; a model folder -> a
:class:`~.interfaces.VisionLanguageModel`, chosen by the ``model_type`` in its ``config.json``.

Every command builds its backbones here, so a new localization or vision-language family is
added in one place: its module, and one entry below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import BackboneNotFoundError
from .interfaces import PromptableSegmenter, VisionLanguageModel


def load_segmenter(sam_type: str, checkpoint: str | Path | None) -> PromptableSegmenter:
    """The frozen promptable segmenter of ``sam_type`` with the weights of ``checkpoint``."""
    from .sam import build_sam
    from .sam_segmenter import SamSegmenter

    return SamSegmenter(build_sam(sam_type, checkpoint))


def load_vlm(model_dir: str | Path) -> VisionLanguageModel:
    """The frozen vision-language model saved in the local folder ``model_dir``."""
    from .clip import ClipEncoder, load_clip

    return ClipEncoder(*load_clip(model_dir))


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
