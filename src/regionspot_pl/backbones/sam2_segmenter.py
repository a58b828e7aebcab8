"""Frozen SAM 2.1 as a :class:`~regionspot_pl.backbones.interfaces.PromptableSegmenter`: images
-> embeddings; region prompts of several images -> region tokens, masks and predicted IoUs, batched.

The image features are ``SAM2ImagePredictor.set_image``'s: the image embedding (with
``no_mem_embed`` added, as for an image without memory) and the two high-resolution feature maps
the mask decoder adds while it upsamples. The region token is the mask decoder's output for its
first mask token, which ``MaskDecoder.forward`` returns as ``sam_tokens_out`` (SAM 2 puts an
object-score token before the IoU token, so it is ``hs[:, 2]`` of the transformer's output, not
``hs[:, 1]`` as in SAM). Masks and IoUs are ``SAM2ImagePredictor.predict(multimask_output=False)``'s:
with the image post-processing on, an unstable single mask is replaced by the best of the three
multimask outputs, IoU included, while the token stays the first mask token's. Everything here is
SAM 2's own code (``sam2``); this module only batches it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from sam2.utils.transforms import SAM2Transforms
from torch.nn import functional as F

from .prompt_batching import BatchedSegmenter
from .sam2_model import Sam2Transform

# (image embedding [B, C, h, w], [feat_s0 [B, C0, 4h, 4w], feat_s1 [B, C1, 2h, 2w]] or None)
Sam2Features = tuple[torch.Tensor, list[torch.Tensor] | None]


class Sam2Segmenter(BatchedSegmenter):
    """Frozen SAM 2 as a promptable segmenter: images -> embeddings; prompts of several images
    -> region tokens, masks, predicted IoUs, batched.

    Attributes:
        model: sam2's ``SAM2Base``.
        image_size: SAM 2's square input side (1024).
        token_dim: width of a region token (256).
        transform: the picklable ``Sam2Transform``; hand it to DataLoader workers instead of
            this module (which holds the weights).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.image_size: int = int(model.image_size)
        decoder = model.sam_mask_decoder
        self.token_dim: int = int(decoder.transformer_dim)
        self.transform = Sam2Transform(self.image_size)
        # SAM2ImagePredictor's mask post-processing at its defaults (threshold 0, no hole filling).
        # Building it scripts a torchvision module, which warns that scripting is deprecated:
        # a warning about sam2's code that a user of this package cannot act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.postprocess = SAM2Transforms(resolution=self.image_size, mask_threshold=0.0)
        # channels of the maps packed into one embedding (encode_images): feat_s0, feat_s1, image
        high_res = [decoder.conv_s0.out_channels, decoder.conv_s1.out_channels] if decoder.use_high_res_features else []
        self._channels = [*high_res, int(model.hidden_dim)]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] from ``transform.normalize_and_pad`` -> [B, 16 C0 + 4 C1 + C, S/16, S/16]:
        ``SAM2ImagePredictor.set_image``'s features, packed into one tensor so that rows stay
        images (C = 256 image embedding, ``no_mem_embed`` added; the decoder's high-resolution
        maps feat_s0 [C0 = 32, S/4, S/4] and feat_s1 [C1 = 64, S/8, S/8] folded into channels by
        ``pixel_unshuffle``, which ``_prepare`` undoes exactly)."""
        model = self.model
        batch = self._checked_input(batch)
        backbone_out = model.forward_image(batch)
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:  # as the predictor does for an image without memory
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        # HW x B x C -> B x C x H x W, as set_image reshapes them: feat_s0, feat_s1, image embedding
        maps = [feat.permute(1, 2, 0).view(len(batch), -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
        side = maps[-1].shape[-1]
        return torch.cat([F.pixel_unshuffle(m, m.shape[-1] // side) for m in maps], dim=1)

    def _prepare(self, embeddings: torch.Tensor) -> Sam2Features:
        """[B, 16 C0 + 4 C1 + C, h, w] from ``encode_images`` -> (image embedding, [feat_s0, feat_s1]).

        The decoder adds feat_s1 after its first 2x upsampling and feat_s0 after its second, so
        they are at 4x and 2x the embedding's resolution."""
        factors = [2 ** (len(self._channels) - 1 - i) for i in range(len(self._channels))]
        parts = embeddings.split([c * f * f for c, f in zip(self._channels, factors)], dim=1)
        maps = [F.pixel_shuffle(p, f) if f > 1 else p for p, f in zip(parts, factors)]
        return maps[-1], (maps[:-1] or None)

    def _decode_chunk(
        self,
        features: Sam2Features,
        owner: torch.Tensor,
        boxes: torch.Tensor | None,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call on n prompts (in SAM 2's input frame), prompt j
        against image ``owner[j]``, as ``SAM2ImagePredictor._predict`` prompts SAM 2.

        Returns:
            tokens [n, 256] float32 (``sam_tokens_out``, the first mask token's output), or
            [n, 3, 256] the three multimask tokens; low-res logits [n, C, h', w']; iou [n, C] float32.
        """
        decoder = self.model.sam_mask_decoder
        if multimask_output and not decoder.use_multimask_token_for_obj_ptr:
            raise ValueError(
                "multimask tokens need a SAM 2 config with use_multimask_token_for_obj_ptr: true "
                "(every packaged SAM 2.1 config has it)"
            )
        image, high_res = features
        sparse, dense = self.model.sam_prompt_encoder(points=_points(boxes, coords, labels), boxes=None, masks=None)
        low_res, iou, sam_tokens, _ = decoder(
            image_embeddings=_per_prompt(image, owner),
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=None if high_res is None else [_per_prompt(f, owner) for f in high_res],
        )
        tokens = sam_tokens if multimask_output else sam_tokens[:, 0]
        return tokens.float(), low_res, iou.float()

    def _masks(self, low_res: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``SAM2Transforms.postprocess_masks`` (bilinear to the image size), threshold 0."""
        return self.postprocess.postprocess_masks(low_res, image_size) > self.postprocess.mask_threshold

    def automatic_mask_generator(self, **settings: Any) -> Any:
        """sam2's ``SAM2AutomaticMaskGenerator`` on this SAM 2 (``settings``: its arguments, named as
        segment-anything's generator names them)."""
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        return SAM2AutomaticMaskGenerator(self.model, **settings)

    def compile(self) -> None:
        """torch.compile SAM 2's mask decoder (dynamic shapes: the prompt count varies per call)
        and image encoder, in place, as :meth:`SamSegmenter.compile` does for SAM."""
        self.model.sam_mask_decoder = torch.compile(self.model.sam_mask_decoder, dynamic=True)
        self.model.image_encoder = torch.compile(self.model.image_encoder)


def _points(
    boxes: torch.Tensor | None, coords: torch.Tensor | None, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM 2's prompt-encoder input: a box is its two corners as points labelled 2 and 3,
    placed before the region's clicks (``SAM2ImagePredictor._predict``).

    Returns:
        (coords [n, K', 2], labels [n, K'] int), K' = K clicks (+ 2 with a box).
    """
    if boxes is None:
        return coords, labels
    corners = boxes.reshape(-1, 2, 2)
    corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(len(boxes), 1)
    if coords is None:
        return corners, corner_labels
    return torch.cat([corners, coords], dim=1), torch.cat([corner_labels, labels], dim=1)


def _per_prompt(maps: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """[B, ...] per image -> [n, ...] per prompt (row ``owner[j]`` for prompt j). When every
    prompt is one image's, a broadcast view of that row, as the predictor broadcasts its one
    image, so a chunk of n prompts holds no n copies of the high-resolution maps."""
    if bool((owner == owner[0]).all()):
        return maps[owner[:1]].expand(len(owner), *maps.shape[1:])
    return maps[owner]
