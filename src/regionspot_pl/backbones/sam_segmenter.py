"""Frozen SAM as a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter`: images ->
embeddings; region prompts of several images -> region tokens, masks and predicted IoUs, batched.

RegionSpot's position-aware region token is the output of SAM's mask decoder two-way transformer
for the first mask token (the one SAM uses when ``multimask_output=False``). The same decoder call
also gives the prompted mask, which mask AP is computed from, and SAM's predicted IoU of it.
Prompts are boxes (training, extraction, test), points with labels, or both (the predictor), as
``SamPredictor`` takes them. Everything here is SAM's own code (``segment_anything``); this module
only batches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling import Sam
from torch import nn

from .interfaces import DecodedRegions, Prompts
from .sam import SamTransform


class SamSegmenter(nn.Module):
    """Frozen SAM as a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter`: images
    -> embeddings; prompts of several images -> region tokens, masks, predicted IoUs, batched.

    Attributes:
        sam: segment-anything's ``Sam``.
        image_size: SAM's square input side (1024 for the official models, 512 for ``tiny``).
        token_dim: width of a region token (256).
        transform: the picklable ``SamTransform``; hand it to DataLoader workers instead of
            this module (which holds the weights).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        self.image_size: int = int(sam.image_encoder.img_size)
        self.token_dim: int = int(sam.mask_decoder.transformer_dim)
        self.transform = SamTransform(self.image_size, sam.pixel_mean, sam.pixel_std)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] from ``transform.normalize_and_pad`` -> [B, 256, S/16, S/16] embeddings."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"encode_images expects [B, 3, {self.image_size}, {self.image_size}] from "
                f"transform.normalize_and_pad, got {tuple(batch.shape)}"
            )
        return self.sam.image_encoder(batch.to(self.device))

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
        calls as ``max_prompts_per_call`` allows, each prompt as ``SamPredictor.predict_torch``
        prompts SAM.

        SAM's decoder adds the image embedding to each prompt's dense embedding
        (``src = repeat(image) + dense``); giving it a zero image and ``dense + image`` per
        prompt computes the same sum, so prompts of different images share one call.

        Args:
            embeddings: [B, 256, h, w] from ``encode_images``.
            prompts: B ``Prompts`` of one signature, in pixels of the images SAM was given.
            image_sizes: B (H, W) of those images.
            multimask_output: SAM's three candidate masks per prompt instead of one.
            with_masks: False skips upsampling the masks (``masks`` None).
            max_prompts_per_call: prompts per decoder call (each costs 256 x h x w floats);
                None = all in one call.

        Returns:
            B ``DecodedRegions``: tokens [N_b, 256] float32, the first mask token's output
            ``hs[:, 1]`` (``hs[:, 0]`` is the iou token), or [N_b, 3, 256] the multimask
            tokens ``hs[:, 2:5]``; masks [N_b, H_b, W_b] bool (SAM's ``postprocess_masks``,
            threshold 0), [N_b, 3, H_b, W_b] with multimask; iou [N_b] float32 ([N_b, 3]).
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
        parts = [
            self._decode_chunk(embeddings, owner[start : start + step], model_prompts, start, multimask_output)
            for start in range(0, len(owner), step)
        ]
        tokens, low_res, iou = (torch.cat([p[j] for p in parts]) if parts else None for j in range(3))
        return [
            self._image_regions(tokens, low_res, iou, (owner == i).nonzero().flatten(), size, multimask_output,
                                with_masks)
            for i, size in enumerate(image_sizes)
        ]  # fmt: skip

    def _model_prompts(
        self, prompts: Sequence[Prompts], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(boxes [N, 4], point coords [N, K, 2], point labels [N, K] int) of all images in
        SAM's input frame, on its device, concatenated in image order; None where absent."""
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

    def _decode_chunk(
        self,
        embeddings: torch.Tensor,
        owner: torch.Tensor,
        model_prompts: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
        start: int,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call for prompts ``start:start + len(owner)`` of
        ``model_prompts``, prompt j against image ``owner[j]`` -> (tokens, low-res logits, iou)."""
        sam, device = self.sam, self.device
        boxes, coords, labels = (None if t is None else t[start : start + len(owner)] for t in model_prompts)
        points = None if coords is None else (coords, labels)
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        embeddings = embeddings.to(device)
        hs, low_res, iou = self._decoder(
            torch.zeros_like(embeddings[:1]), sparse, dense + embeddings[owner.to(device)], multimask_output
        )
        # token i+1 of hs is mask output i; multimask answers with mask outputs 1..3
        tokens = (hs[:, 2:5] if multimask_output else hs[:, 1]).float()
        return tokens, low_res, iou.float()

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
            masks = self.sam.postprocess_masks(low_res[rows], self.transform.unpadded_size(image_size), image_size)
            masks = masks > self.sam.mask_threshold
            masks = masks if multimask_output else masks[:, 0]
        return DecodedRegions(tokens[rows], masks, iou[rows] if multimask_output else iou[rows, 0])

    def _decoder(
        self, image: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's mask decoder on [1, 256, h, w] ``image`` and n prompts' embeddings ->
        (hs [n, tokens, 256], low-res mask logits, predicted IoU).

        ``MaskDecoder.predict_masks`` computes hs (the transformer's token outputs) but returns
        only masks and iou; a forward hook on its transformer, whose output is (hs, src),
        captures hs without copying SAM's code.
        """
        sam = self.sam
        captured: list[torch.Tensor] = []
        handle = sam.mask_decoder.transformer.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[0])
        )
        try:
            low_res, iou = sam.mask_decoder(
                image_embeddings=image,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        finally:
            handle.remove()
        return captured[0], low_res, iou

    def compile(self) -> None:
        """torch.compile SAM's mask decoder (dynamic shapes: the prompt count varies per call)
        and image encoder. Most of the decoder's time goes to small elementwise operations
        (adds, copies, softmax, LayerNorm) that compiling fuses; outputs equal eager up to float
        rounding (tests/extract/test_extract.py). The modules are replaced in place, so SAM's own code
        (and the region-token hook on the decoder's transformer) runs inside the compiled graph."""
        self.sam.mask_decoder = torch.compile(self.sam.mask_decoder, dynamic=True)
        self.sam.image_encoder = torch.compile(self.sam.image_encoder)
