"""What every promptable segmenter here shares: the region prompts of several images, moved into
the model's input frame, decoded in as few calls as a bound allows, and split back per image.

:class:`BatchedSegmenter` implements
:meth:`~regionspot_pl.backbones.interfaces.PromptableSegmenter.decode` once; a family
(:class:`~regionspot_pl.backbones.sam_segmenter.SamSegmenter`,
:class:`~regionspot_pl.backbones.sam2_segmenter.Sam2Segmenter`) supplies one decoder call on a
chunk of prompts (``_decode_chunk``) and the upsampling of its low-resolution mask logits
(``_masks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .interfaces import DecodedRegions, Prompts, SegmenterTransform

# (boxes [N, 4], point coords [N, K, 2], point labels [N, K] int) in the model's input frame;
# None where the prompts have none.
ModelPrompts = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


class BatchedSegmenter(nn.Module):
    """The batching half of a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter`.

    Subclasses set ``transform``, ``image_size`` and ``token_dim``, define ``device``, and implement
    ``_decode_chunk`` and ``_masks`` (and may override ``_prepare``).
    """

    transform: SegmenterTransform
    image_size: int
    token_dim: int

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _checked_input(self, batch: torch.Tensor) -> torch.Tensor:
        """``encode_images``' input, refused unless [B, 3, S, S]; on the device."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"encode_images expects [B, 3, {self.image_size}, {self.image_size}] from "
                f"transform.normalize_and_pad, got {tuple(batch.shape)}"
            )
        return batch.to(self.device)

    @torch.no_grad()
    def decode(
        self,
        embeddings: torch.Tensor,
        prompts: Sequence[Prompts],
        image_sizes: Sequence[tuple[int, int]],
        multimask_output: bool = False,
        with_masks: bool = True,
        max_prompts_per_call: int | None = None,
    ) -> list[DecodedRegions]:
        """Region tokens, masks and predicted IoUs for the prompts of B images, in as few decoder
        calls as ``max_prompts_per_call`` allows; prompt j of a call is decoded against the
        embedding of the image it belongs to, so prompts of several images share a call.

        Args:
            embeddings: [B, ...] from ``encode_images``.
            prompts: B ``Prompts`` of one signature, in pixels of the images the segmenter was given.
            image_sizes: B (H, W) of those images.
            multimask_output: three candidate masks per prompt instead of one.
            with_masks: False skips upsampling the masks (``masks`` None).
            max_prompts_per_call: prompts per decoder call (each holds a copy of its image's
                features); None = all in one call.

        Returns:
            B ``DecodedRegions``: tokens [N_b, D] float32 ([N_b, 3, D] with multimask); masks
            [N_b, H_b, W_b] bool ([N_b, 3, H_b, W_b]); iou [N_b] float32 ([N_b, 3]).
        """
        if not (len(prompts) == len(image_sizes) == embeddings.shape[0]):
            raise ValueError(
                f"{embeddings.shape[0]} embeddings, {len(prompts)} prompt sets and "
                f"{len(image_sizes)} sizes: give one of each per image"
            )
        if not prompts:
            return []
        if len({p.signature for p in prompts}) > 1:
            raise ValueError("the prompts of one decode call must be alike: all with boxes or none, K points each")
        owner = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(prompts)])
        step = max(1, len(owner) if max_prompts_per_call is None else int(max_prompts_per_call))
        model_prompts = self._model_prompts(prompts, image_sizes)
        features = self._prepare(embeddings.to(self.device))
        parts = []
        for start in range(0, len(owner), step):
            chunk = (None if t is None else t[start : start + step] for t in model_prompts)
            parts.append(
                self._decode_chunk(features, owner[start : start + step].to(self.device), *chunk, multimask_output)
            )
        tokens, low_res, iou = (torch.cat([p[j] for p in parts]) if parts else None for j in range(3))
        return [
            self._image_regions(tokens, low_res, iou, (owner == i).nonzero().flatten(), size, multimask_output,
                                with_masks)
            for i, size in enumerate(image_sizes)
        ]  # fmt: skip

    def _model_prompts(self, prompts: Sequence[Prompts], image_sizes: Sequence[tuple[int, int]]) -> ModelPrompts:
        """The prompts of all images in the model's input frame (``transform.apply_boxes`` and
        ``apply_coords``), on its device, concatenated in image order."""
        device, transform = self.device, self.transform
        boxes = coords = labels = None
        if prompts[0].boxes is not None:
            boxes = torch.cat(
                [transform.apply_boxes(p.boxes.to(device, torch.float32).reshape(-1, 4), size)
                 for p, size in zip(prompts, image_sizes)]
            )  # fmt: skip
        if prompts[0].point_coords is not None:
            coords = torch.cat(
                [transform.apply_coords(p.point_coords.to(device, torch.float32), size)
                 for p, size in zip(prompts, image_sizes)]
            )  # fmt: skip
            labels = torch.cat([p.point_labels.to(device, torch.int) for p in prompts])
        return boxes, coords, labels

    def _prepare(self, embeddings: torch.Tensor) -> Any:
        """``encode_images``' output, on the device -> what ``_decode_chunk`` reads (once per decode)."""
        return embeddings

    def _decode_chunk(
        self,
        features: Any,
        owner: torch.Tensor,
        boxes: torch.Tensor | None,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call on n prompts, prompt j against image ``owner[j]``.

        Returns:
            tokens [n, D] float32 ([n, 3, D] with multimask), low-res mask logits [n, C, h, w]
            and predicted IoU [n, C] float32, C = 3 with multimask, else 1.
        """
        raise NotImplementedError

    def _masks(self, low_res: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[n, C, h, w] low-res logits -> [n, C, H, W] bool masks of an (H, W) image."""
        raise NotImplementedError

    def _image_regions(
        self,
        tokens: torch.Tensor | None,
        low_res: torch.Tensor | None,
        iou: torch.Tensor | None,
        rows: torch.Tensor,
        image_size: tuple[int, int],
        multimask_output: bool,
        with_masks: bool,
    ) -> DecodedRegions:
        """The ``rows`` of the decoded prompts that are one image's, masks upsampled to its size."""
        extra = (3,) if multimask_output else ()
        if len(rows) == 0:
            device = self.device
            return DecodedRegions(
                torch.zeros(0, *extra, self.token_dim, device=device),
                torch.zeros(0, *extra, *image_size, dtype=torch.bool, device=device) if with_masks else None,
                torch.zeros(0, *extra, device=device),
            )
        rows = rows.to(tokens.device)
        masks = None
        if with_masks:
            masks = self._masks(low_res[rows], image_size)
            masks = masks if multimask_output else masks[:, 0]
        return DecodedRegions(tokens[rows], masks, iou[rows] if multimask_output else iou[rows, 0])
