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

from typing import Any

import torch
from segment_anything.modeling import Sam

from .prompt_batching import BatchedSegmenter
from .sam import SamTransform


class SamSegmenter(BatchedSegmenter):
    """Frozen SAM as a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter`: images
    -> embeddings; prompts of several images -> region tokens, masks, predicted IoUs, batched.

    Attributes:
        sam: segment-anything's ``Sam``.
        image_size: SAM's square input side (1024 for the official models, 512 for ``tiny`` unless its
            checkpoint was written at another size).
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
        return self.sam.image_encoder(self._checked_input(batch))

    def _decode_chunk(
        self,
        embeddings: torch.Tensor,
        owner: torch.Tensor,
        boxes: torch.Tensor | None,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call on n prompts (in SAM's input frame), prompt j
        against image ``owner[j]`` of ``embeddings`` [B, 256, h, w], as ``SamPredictor.predict_torch``
        prompts SAM.

        SAM's decoder adds the image embedding to each prompt's dense embedding
        (``src = repeat(image) + dense``); giving it a zero image and ``dense + image`` per
        prompt computes the same sum, so prompts of different images share one call.

        Returns:
            tokens [n, 256] float32, the first mask token's output ``hs[:, 1]`` (``hs[:, 0]``
            is the iou token), or [n, 3, 256] the multimask tokens ``hs[:, 2:5]``; low-res
            logits [n, C, h', w']; iou [n, C] float32.
        """
        sam = self.sam
        points = None if coords is None else (coords, labels)
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        hs, low_res, iou = self._decoder(
            torch.zeros_like(embeddings[:1]), sparse, dense + embeddings[owner], multimask_output
        )
        # token i+1 of hs is mask output i; multimask answers with mask outputs 1..3
        tokens = (hs[:, 2:5] if multimask_output else hs[:, 1]).float()
        return tokens, low_res, iou.float()

    def _masks(self, low_res: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """SAM's ``postprocess_masks`` (unpad, upsample to the image size), threshold 0."""
        masks = self.sam.postprocess_masks(low_res, self.transform.unpadded_size(image_size), image_size)
        return masks > self.sam.mask_threshold

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

    def automatic_mask_generator(self, **settings: Any) -> Any:
        """segment-anything's ``SamAutomaticMaskGenerator`` on this SAM (``settings``: its arguments)."""
        from segment_anything import SamAutomaticMaskGenerator

        return SamAutomaticMaskGenerator(self.sam, **settings)

    def compile(self) -> None:
        """torch.compile SAM's mask decoder (dynamic shapes: the prompt count varies per call)
        and image encoder. Most of the decoder's time goes to small elementwise operations
        (adds, copies, softmax, LayerNorm) that compiling fuses; outputs equal eager up to float
        rounding (tests/extract/test_extract.py). The modules are replaced in place, so SAM's own code
        (and the region-token hook on the decoder's transformer) runs inside the compiled graph."""
        self.sam.mask_decoder = torch.compile(self.sam.mask_decoder, dynamic=True)
        self.sam.image_encoder = torch.compile(self.sam.image_encoder)
