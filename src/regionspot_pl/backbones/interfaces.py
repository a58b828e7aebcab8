"""The two kinds of frozen model RegionSpot combines, as interfaces, and the prompts they share.

A promptable segmenter (SAM) localizes: it embeds an image once, then turns region prompts
(boxes and/or points with labels) into one region token, mask and predicted IoU each. A
vision-language model (CLIP, MetaCLIP 2, SigLIP) describes: it turns an image into a feature map whose first token
is global, and class names into text embeddings of the same space.
:class:`~regionspot_pl.backbones.encoder.RegionEncoder` holds one of each. Another family plugs
in by implementing the protocol of its kind (structural typing: nothing to inherit);
:class:`~regionspot_pl.backbones.sam_segmenter.SamSegmenter` (SAM),
:class:`~regionspot_pl.backbones.sam2_segmenter.Sam2Segmenter` (SAM 2.1) and
:class:`~regionspot_pl.backbones.vlm.FrozenVisionLanguageModel`'s families (``ClipEncoder``,
``MetaClip2Encoder``, ``SiglipEncoder``) are the implementations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .image import scale_boxes, scale_points


@dataclass(frozen=True)
class Prompts:
    """N region prompts of one image, alike in kind: a box each, K points each, or both (region
    i is box i with the points of row i), in pixels of one image (which one is the caller's).

    Attributes:
        boxes: [N, 4] x1, y1, x2, y2, or None.
        point_coords: [N, K, 2] x, y (the same K for all N), or None.
        point_labels: [N, K], 1 foreground, 0 background; given exactly when ``point_coords`` is.
    """

    boxes: Tensor | None = None
    point_coords: Tensor | None = None
    point_labels: Tensor | None = None

    def __post_init__(self) -> None:
        boxes, coords, labels = self.boxes, self.point_coords, self.point_labels
        if boxes is None and coords is None:
            raise ValueError("give boxes, point_coords (with point_labels), or both")
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[1] != 4):
            raise ValueError(f"boxes must be [N, 4] xyxy pixels, got {tuple(boxes.shape)}")
        if coords is not None:
            if coords.ndim != 3 or coords.shape[2] != 2:
                raise ValueError(f"point_coords must be [N, K, 2] x, y pixels, got {tuple(coords.shape)}")
            if labels is None or tuple(labels.shape) != tuple(coords.shape[:2]):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"point_labels must be [N, K] = {tuple(coords.shape[:2])}, got {got}")
            if boxes is not None and coords.shape[0] != boxes.shape[0]:
                raise ValueError(
                    f"{boxes.shape[0]} boxes but {coords.shape[0]} point prompts: give one of each per region"
                )
        elif labels is not None:
            raise ValueError("point_labels given without point_coords")

    def __len__(self) -> int:
        return int(self.boxes.shape[0] if self.boxes is not None else self.point_coords.shape[0])

    @property
    def signature(self) -> tuple[bool, int]:
        """(has boxes, points per region): prompts decode together only when alike in both."""
        return self.boxes is not None, 0 if self.point_coords is None else int(self.point_coords.shape[1])

    def to(self, device: torch.device | str) -> Prompts:
        """The same prompts on ``device`` (dtypes kept)."""
        parts = (self.boxes, self.point_coords, self.point_labels)
        return Prompts(*(None if part is None else part.to(device) for part in parts))

    def scaled(self, from_size: tuple[int, int], to_size: tuple[int, int]) -> Prompts:
        """The prompts in pixels of the same image resized from (H, W) ``from_size`` to (h, w)
        ``to_size`` (float32; ``scale_boxes`` and ``scale_points``)."""
        boxes = None if self.boxes is None else scale_boxes(self.boxes, from_size, to_size)
        coords = None if self.point_coords is None else scale_points(self.point_coords, from_size, to_size)
        return Prompts(boxes, coords, self.point_labels)


@dataclass
class DecodedRegions:
    """A segmenter's answer to the prompts of one image.

    Attributes:
        tokens: [N, D] float32 region tokens (SAM: D = 256); [N, 3, D] with multimask output.
        masks: [N, h, w] bool at the size of the image the segmenter was given ([N, 3, h, w]
            with multimask output), or None when masks were not asked for.
        iou: [N] float32, the segmenter's predicted IoU of each mask ([N, 3]).
    """

    tokens: Tensor
    masks: Tensor | None
    iou: Tensor


class SegmenterTransform(Protocol):
    """A segmenter's input transform, without its weights: picklable, so image loader workers
    run the host half (``resize``) and the device runs the rest."""

    image_size: int  # side of the square input

    def resize(self, image: np.ndarray) -> Tensor:
        """HxWx3 uint8 RGB -> [3, h, w] uint8, the host half of the transform (SAM: the longest
        side ``image_size``; SAM 2: the pixels unchanged, as it resizes float pixels)."""
        ...

    def normalize_and_pad(self, resized: Tensor) -> Tensor:
        """[3, h, w] uint8 from ``resize`` -> [3, S, S] float32 (normalized, resized or padded
        to the square), same device."""
        ...

    def unpadded_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) that an (H, W) image takes inside the square ((S, S) where it fills it)."""
        ...

    def apply_boxes(self, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        """[N, 4] xyxy in pixels of an (H, W) image -> the same boxes in the model's input frame."""
        ...

    def apply_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """[..., 2] x, y in pixels of an (H, W) image -> the model's input frame."""
        ...


class PromptableSegmenter(Protocol):
    """A promptable localization model (SAM): image -> embedding; (embedding, prompts) -> region
    tokens, masks and predicted IoUs. Frozen; an ``nn.Module`` (``to``, ``eval``)."""

    transform: SegmenterTransform
    image_size: int  # side of the square input
    token_dim: int  # width of a region token

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> PromptableSegmenter: ...

    def eval(self) -> PromptableSegmenter: ...

    def encode_images(self, batch: Tensor) -> Tensor:
        """[B, 3, S, S] from ``transform.normalize_and_pad`` -> [B, ...] image embeddings: one
        tensor whose row b is all that ``decode`` needs of image b, in the family's own layout
        (SAM: [B, 256, S/16, S/16]; SAM 2 also packs its high-resolution maps into channels)."""
        ...

    def decode(
        self,
        embeddings: Tensor,
        prompts: Sequence[Prompts],
        image_sizes: Sequence[tuple[int, int]],
        multimask_output: bool = False,
        with_masks: bool = True,
        max_prompts_per_call: int | None = None,
    ) -> list[DecodedRegions]:
        """The prompts of B images (one ``Prompts`` each, all of one signature, in pixels of
        the (h, w) image given to ``transform.resize``) against their rows of ``embeddings``."""
        ...

    def compile(self) -> None:
        """Replace the heavy modules by ``torch.compile``d ones (same results up to rounding)."""
        ...


class VisionLanguageModel(Protocol):
    """A vision-language model (CLIP, SigLIP): images -> feature map, global token first; class names ->
    text embeddings of the same space. Frozen; an ``nn.Module`` (``to``, ``eval``)."""

    image_size: int  # side of the square input
    vision_dim: int  # width of a feature-map token
    text_dim: int  # width of the joint (text) embedding
    num_tokens: int  # 1 + grid**2: the global token, then the patches
    grid: int  # side of the patch grid
    mean: tuple[float, float, float]  # per-channel normalisation of pixels in [0, 1]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device: ...

    @property
    def logit_scale(self) -> float:
        """The learnt temperature of its image-text logits (exp of the stored log scale)."""
        ...

    def to(self, device: torch.device | str) -> VisionLanguageModel: ...

    def eval(self) -> VisionLanguageModel: ...

    def preprocess(self, image: Tensor) -> Tensor:
        """[3, H, W] uint8 -> [3, image_size, image_size] float32 model input, on its device."""
        ...

    def feature_map(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] -> [B, num_tokens, vision_dim], the global token first."""
        ...

    def encode_texts(self, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Class names -> [C, text_dim] L2-normalized embeddings, averaged over the templates."""
        ...

    def compile(self) -> None:
        """Replace the vision tower by a ``torch.compile``d one (same results up to rounding)."""
        ...
