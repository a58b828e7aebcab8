"""The CLIP crop baselines of RegionSpot's Table 1: name each box by CLIP on its crop alone.

``clip-box``: the box is cut out of the original image, resized to the model's square input
(``square_preprocess`` with the model's mean and std) and embedded with its image tower (the
model's own image embedding: CLIP's projected class token, SigLIP's attention-pooled feature);
logits = 100 * cos(crop, text), the scale the head uses.
``clip-mask``: the same crop, but the pixels outside the box's SAM mask are filled with the
image's mean colour first, so the background inside the box does not vote.

Published on LVIS val with GT boxes (APr / APc / APf / AP): box crop 40.6 / 53.1 / 59.2 / 48.7,
SAM-mask crop 40.8 / 53.5 / 59.6 / 49.2. The scoring afterwards is RegionSpot's own
(:func:`~regionspot_pl.evaluation.score_regions`), so the numbers compare like for like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from ..backbones.clip import CLIP_MEAN, CLIP_STD
from ..backbones.vlm import FrozenVisionLanguageModel, square_preprocess

BASELINES: tuple[str, ...] = ("clip-box", "clip-mask")


def crop_window(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1), end exclusive, that covers a float xyxy box.

    Rounded outwards and clipped to the image; at least one pixel each way, so a degenerate
    box still gives a crop CLIP can take.
    """
    x0 = min(max(int(math.floor(box[0])), 0), width - 1)
    y0 = min(max(int(math.floor(box[1])), 0), height - 1)
    x1 = max(min(int(math.ceil(box[2])), width), x0 + 1)
    y1 = max(min(int(math.ceil(box[3])), height), y0 + 1)
    return x0, y0, x1, y1


def box_crops(
    image: np.ndarray,
    boxes: np.ndarray,
    size: int,
    masks_rle: Sequence[dict[str, Any]] | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """Crops of an image's boxes, ready for CLIP.

    Args:
        image: [H, W, 3] uint8 RGB, the original image the boxes are in.
        boxes: [N, 4] xyxy in original image pixels.
        size: the model's square input side (``image_size`` of the vision-language model).
        masks_rle: N COCO RLEs of the boxes' SAM masks (``clip-mask``), or None (``clip-box``).
            Pixels outside a box's mask are set to the image's mean colour.
        mean, std: the model's pixel normalisation (CLIP's by default).

    Returns:
        [N, 3, size, size] float32, normalized.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    if masks_rle is not None and len(masks_rle) != len(boxes):
        raise ValueError(f"{len(masks_rle)} masks for {len(boxes)} boxes")
    if len(boxes) == 0:
        return torch.zeros(0, 3, size, size)
    pixels = torch.from_numpy(image).permute(2, 0, 1)  # [3, H, W] uint8, a view
    masks = fill = None
    if masks_rle is not None:
        masks = mask_utils.decode(list(masks_rle))  # [H, W, N] uint8; str counts are accepted
        if masks.shape[:2] != (height, width):
            raise ValueError(f"masks are {masks.shape[1]}x{masks.shape[0]} but the image is {width}x{height}")
        fill = pixels.float().mean(dim=(1, 2)).round().to(torch.uint8)[:, None, None]  # [3, 1, 1]
    crops = []
    for n, box in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = crop_window(box, width, height)
        crop = pixels[:, y0:y1, x0:x1]
        if masks is not None:
            inside = torch.from_numpy(masks[y0:y1, x0:x1, n].astype(bool))[None]  # [1, h, w]
            crop = torch.where(inside, crop, fill)
        crops.append(square_preprocess(crop, size, mean, std))
    return torch.stack(crops)


@torch.no_grad()
def crop_logits(
    encoder: FrozenVisionLanguageModel, crops: Tensor, text_embeddings: Tensor, batch_size: int = 256
) -> Tensor:
    """[N, 3, S, S] crops x [C, D] text embeddings -> [N, C] logits = the model's logit scale x
    cosine (on CPU; 100 for CLIP).

    The model's image tower runs ``batch_size`` crops at a time on the encoder's device.
    """
    texts = torch.nn.functional.normalize(text_embeddings.float(), dim=-1).to(encoder.device)
    out = []
    for start in range(0, len(crops), batch_size):
        emb = encoder.encode_image_embeddings(crops[start : start + batch_size]).float()
        out.append((encoder.logit_scale * emb @ texts.t()).cpu())
    return torch.cat(out) if out else torch.zeros(0, len(text_embeddings))
