"""The one encode path: an image and its region prompts -> what the feature cache holds.

:class:`RegionEncoder` holds a promptable segmenter (SAM) and a vision-language model (CLIP) on
one device at one autocast precision, and runs, in batches, the steps both extraction and the
predictor take (the image path of :mod:`regionspot_pl.backbones.image`):

1. host (loader workers): the image -> detectron2's resize -> the host half of the segmenter's
   transform (SAM: its longest-side resize), both uint8 (:func:`image_input`);
2. device: both model inputs (``segmenter_batch``, ``vlm_batch``), the segmenter's image
   embeddings (``embed_images``) and the vision-language feature map (``image_tokens``);
3. device: the prompts, scaled from original pixels into the resized image, through the
   segmenter's decoder (``decode``): region tokens, masks at the resized size (then upsampled
   to the original size) and predicted IoUs.

Region tokens and image tokens come back rounded to float16, as the cache stores them, so the
predictor's features equal the cached ones for the same image and prompts. Each step is a
method of its own, so a benchmark can time them one by one; ``encode`` runs them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .common import autocast_for
from .image import masks_to_original, resize_for_backbones
from .interfaces import PromptableSegmenter, Prompts, SegmenterTransform, VisionLanguageModel

# The dtype the feature cache stores region tokens and image tokens in.
CACHE_DTYPE = torch.float16


@dataclass(frozen=True)
class ImageInput:
    """One image made ready on the host for both models, uint8 (a quarter of float32's bytes
    to cross to the device).

    Attributes:
        original_size: (H, W) of the image as read.
        resized_size: (h, w) after detectron2's resize: the image both models see.
        segmenter_image: [3, h', w'] uint8, the resized image after the host half of the
            segmenter's transform (``SegmenterTransform.resize``: SAM's longest-side resize;
            SAM 2 resizes on the device).
        vlm_image: [3, h, w] uint8, the resized image (the vision-language model resizes it
            on the device).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    segmenter_image: Tensor
    vlm_image: Tensor

    def pin_memory(self) -> ImageInput:
        """A copy in page-locked memory (a DataLoader with ``pin_memory=True`` calls this), so
        the copies to the GPU run asynchronously."""
        return replace(self, segmenter_image=self.segmenter_image.pin_memory(), vlm_image=self.vlm_image.pin_memory())


def image_input(image: np.ndarray, transform: SegmenterTransform) -> ImageInput:
    """HxWx3 uint8 RGB -> its :class:`ImageInput` (host work only: runs in loader workers)."""
    resized = resize_for_backbones(image)
    return ImageInput(
        original_size=(int(image.shape[0]), int(image.shape[1])),
        resized_size=(int(resized.shape[0]), int(resized.shape[1])),
        segmenter_image=transform.resize(resized),
        vlm_image=torch.from_numpy(resized).permute(2, 0, 1),
    )


@dataclass
class ImageFeatures:
    """An image encoded by both models, ready for any number of prompts.

    Attributes:
        embedding: the segmenter's image embedding (SAM: [256, 64, 64] float, 32 x 32 tiny;
            SAM 2: [1024, 64, 64], its high-resolution maps packed in).
        image_tokens: [T, vision_dim] float16, the vision-language feature map (global token first).
        original_size, resized_size: as in :class:`ImageInput`.
    """

    embedding: Tensor
    image_tokens: Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


@dataclass
class RegionFeatures:
    """The prompts of one image, decoded.

    Attributes:
        tokens: [N, 256] float16 region tokens ([N, 3, 256] with multimask output).
        masks: [N, H, W] bool at the original size ([N, 3, H, W]), or None when not asked for.
        iou: [N] float32, the segmenter's predicted IoU of each mask ([N, 3]).
    """

    tokens: Tensor
    masks: Tensor | None
    iou: Tensor


@dataclass
class EncodedImage:
    """What the feature cache holds for one image (all on the encoder's device).

    Attributes:
        regions: its prompts' tokens [N, 256] float16, masks [N, H, W] bool (or None), iou [N].
        image_tokens: [T, vision_dim] float16, the vision-language feature map.
    """

    regions: RegionFeatures
    image_tokens: Tensor


class RegionEncoder:
    """A promptable segmenter and a vision-language model on one device, run at one autocast
    precision: images and their region prompts -> region tokens, masks, IoUs and image tokens.

    Attributes:
        segmenter: a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter` (SAM).
        vlm: a :class:`~regionspot_pl.backbones.interfaces.VisionLanguageModel` (CLIP).
        device: where both run.
        precision: ``auto``, ``fp32``, ``fp16`` or ``bf16`` (``common.autocast_for``).
        max_prompts_per_call: prompts per decoder call; the decoder holds a copy of the image
            embedding per prompt, so this bounds its memory.
    """

    def __init__(
        self,
        segmenter: PromptableSegmenter,
        vlm: VisionLanguageModel,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        max_prompts_per_call: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.segmenter = segmenter.to(self.device).eval()
        self.vlm = vlm.to(self.device).eval()
        self.precision = precision
        self.max_prompts_per_call = max_prompts_per_call

    def image_input(self, image: np.ndarray) -> ImageInput:
        """HxWx3 uint8 RGB -> :class:`ImageInput` (:func:`image_input` with this segmenter's transform)."""
        return image_input(image, self.segmenter.transform)

    def compile(self) -> None:
        """torch.compile both models' heavy modules in place (``compile`` of each)."""
        self.segmenter.compile()
        self.vlm.compile()

    # ------------------------------------------------------------------------------ stages
    @torch.inference_mode()
    def segmenter_batch(self, inputs: Sequence[ImageInput]) -> Tensor:
        """-> [B, 3, S, S] float32 segmenter input on the device: moved as uint8, normalized
        and padded there."""
        transform = self.segmenter.transform
        return torch.stack(
            [transform.normalize_and_pad(i.segmenter_image.to(self.device, non_blocking=True)) for i in inputs]
        )

    @torch.inference_mode()
    def vlm_batch(self, inputs: Sequence[ImageInput]) -> Tensor:
        """-> [B, 3, s, s] float32 vision-language input on the device (``vlm.preprocess``)."""
        return torch.stack([self.vlm.preprocess(i.vlm_image.to(self.device, non_blocking=True)) for i in inputs])

    @torch.inference_mode()
    def embed_images(self, batch: Tensor) -> Tensor:
        """[B, 3, S, S] from ``segmenter_batch`` -> [B, ...] segmenter image embeddings."""
        # On a CPU a batch only adds memory traffic to SAM's ViT, whose matmuls already use
        # every core one image at a time; on a GPU the batch is what fills the device
        # (docs/benchmarks.md).
        per_call = 1 if self.device.type == "cpu" else len(batch)
        with autocast_for(self.device, self.precision):
            return torch.cat([self.segmenter.encode_images(chunk) for chunk in batch.split(per_call)])

    @torch.inference_mode()
    def image_tokens(self, batch: Tensor) -> Tensor:
        """[B, 3, s, s] from ``vlm_batch`` -> [B, T, vision_dim] float16 feature maps."""
        with autocast_for(self.device, self.precision):
            return self.vlm.feature_map(batch).to(CACHE_DTYPE)

    def embed(self, inputs: Sequence[ImageInput]) -> list[ImageFeatures]:
        """Both models on B images -> one :class:`ImageFeatures` each."""
        if not inputs:
            return []
        embeddings = self.embed_images(self.segmenter_batch(inputs))
        tokens = self.image_tokens(self.vlm_batch(inputs))
        return [
            ImageFeatures(embedding, image_tokens, i.original_size, i.resized_size)
            for embedding, image_tokens, i in zip(embeddings, tokens, inputs)
        ]

    @torch.inference_mode()
    def decode(
        self,
        features: Sequence[ImageFeatures],
        prompts: Sequence[Prompts],
        multimask_output: bool = False,
        with_masks: bool = True,
    ) -> list[RegionFeatures]:
        """The prompts of B images (one :class:`Prompts` each, in original pixels, all of one
        signature) -> one :class:`RegionFeatures` each, in as few decoder calls as
        ``max_prompts_per_call`` allows. ``with_masks=False`` skips the masks (None)."""
        if len(features) != len(prompts):
            raise ValueError(f"{len(features)} images but {len(prompts)} prompt sets: give one per image")
        if not features:
            return []
        in_resized = [p.to(self.device).scaled(f.original_size, f.resized_size) for f, p in zip(features, prompts)]
        with autocast_for(self.device, self.precision):
            decoded = self.segmenter.decode(
                torch.stack([f.embedding for f in features]),
                in_resized,
                [f.resized_size for f in features],
                multimask_output=multimask_output,
                with_masks=with_masks,
                max_prompts_per_call=self.max_prompts_per_call,
            )
        return [
            RegionFeatures(d.tokens.to(CACHE_DTYPE), _to_original(d.masks, f.original_size), d.iou)
            for d, f in zip(decoded, features)
        ]

    def encode(
        self,
        inputs: Sequence[ImageInput],
        prompts: Sequence[Prompts],
        multimask_output: bool = False,
        with_masks: bool = True,
    ) -> list[EncodedImage]:
        """Every step on B images and their prompts (original pixels) -> one
        :class:`EncodedImage` each, in order."""
        features = self.embed(inputs)
        regions = self.decode(features, prompts, multimask_output, with_masks)
        return [EncodedImage(r, f.image_tokens) for r, f in zip(regions, features)]


def _to_original(masks: Tensor | None, original_size: tuple[int, int]) -> Tensor | None:
    """[N, (3,) h, w] bool at the resized size -> [N, (3,) H, W] (``masks_to_original``)."""
    if masks is None:
        return None
    lead = masks.shape[:-2]
    return masks_to_original(masks.reshape(-1, *masks.shape[-2:]), original_size).reshape(*lead, *original_size)
