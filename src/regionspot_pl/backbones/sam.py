"""Frozen SAM: building it from a checkpoint, and its input transform (:class:`SamTransform`).

The model itself, as a promptable segmenter, is :class:`~regionspot_pl.backbones.sam_segmenter.SamSegmenter`.
Everything here is SAM's own code (``segment_anything``); this module only builds and loads it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.nn import functional as F

from .common import BackboneError, BackboneNotFoundError, frozen_with_weights
from .image import check_rgb_uint8

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")

OFFICIAL_SAM_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "tiny": "sam_tiny.pth",
}

# The tiny SAM is for tests and CPU smoke runs: SAM's own classes at a toy size. The checkpoint
# holds only a state dict, so these constants are what makes it loadable again; change them and
# every sam_tiny.pth written before no longer fits. Its input size is the one exception: 512 by
# default, any multiple of 16 given to ``build_tiny_sam``, read back from a checkpoint's embedding
# grid. The prompt encoder and mask decoder are SAM's standard ones, so the region token is 256-d
# exactly as with the real models.
TINY_SAM_CONFIG: dict[str, object] = {
    "encoder_embed_dim": 64,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "image_size": 512,
}

# (embed dim, depth, embedding grid) of each type's image encoder, read off a state dict to say
# which type a checkpoint is before any (possibly 600M-parameter) model is built.
_SIGNATURES = {
    "vit_b": (768, 12, 64),
    "vit_l": (1024, 24, 64),
    "vit_h": (1280, 32, 64),
    "tiny": (
        TINY_SAM_CONFIG["encoder_embed_dim"],
        TINY_SAM_CONFIG["encoder_depth"],
        int(TINY_SAM_CONFIG["image_size"]) // 16,
    ),
}


def build_tiny_sam(image_size: int = int(TINY_SAM_CONFIG["image_size"])) -> Sam:
    """A randomly initialised tiny SAM (``TINY_SAM_CONFIG``) with an ``image_size`` square input
    (a multiple of 16), built like ``_build_sam``."""
    prompt_embed_dim = 256
    patch_size = 16
    grid = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=int(TINY_SAM_CONFIG["encoder_depth"]),
            embed_dim=int(TINY_SAM_CONFIG["encoder_embed_dim"]),
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=int(TINY_SAM_CONFIG["encoder_num_heads"]),
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(TINY_SAM_CONFIG["encoder_global_attn_indexes"]),
            window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def _signature(state: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """(embed dim, depth, grid) of a SAM state dict's image encoder, or None if not SAM-like."""
    pos = state.get("image_encoder.pos_embed")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 4:
        return None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    return int(pos.shape[3]), depth, int(pos.shape[1])


def build_sam(sam_type: str, checkpoint: str | Path | None) -> Sam:
    """Build a frozen SAM of ``sam_type`` and load ``checkpoint`` (a plain state dict).

    ``checkpoint=None`` gives random weights (only sensible for ``tiny``). The file is read with
    ``torch.load(weights_only=True)``; segment-anything's builders would unpickle it unrestricted,
    so they are called with ``checkpoint=None`` and the state dict is loaded here.

    Returns:
        the ``Sam`` in eval mode with ``requires_grad`` False on every parameter.
    """
    if sam_type not in SAM_TYPES:
        raise BackboneError(f"unknown --sam_type {sam_type!r}; choose one of {', '.join(SAM_TYPES)}")
    state = None
    if checkpoint is not None:
        path = Path(checkpoint)
        official = OFFICIAL_SAM_CHECKPOINTS[sam_type]
        if not path.is_file():
            hint = (
                "write one with `python -m regionspot_pl.tiny DIR`"
                if sam_type == "tiny"
                else "download it from the segment-anything release"
            )
            raise BackboneNotFoundError(
                f"SAM checkpoint {str(path)!r} not found; --sam_type {sam_type} expects the "
                f"official file {official} ({hint}) and its path in --sam_checkpoint"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors, truncated files, ...
            raise BackboneError(
                f"checkpoint {str(path)!r} could not be read as a SAM state dict "
                f"(expected the official {official}): {err}"
            ) from err
        if isinstance(state, dict) and "model" in state and "image_encoder.pos_embed" not in state:
            state = state["model"]  # a training checkpoint wrapping the state dict
        sig = _signature(state) if isinstance(state, dict) else None
        if sig is None:
            raise BackboneError(
                f"checkpoint {str(path)!r} does not fit --sam_type {sam_type}: it is not a SAM "
                f"state dict (no 'image_encoder.pos_embed'); expected the official {official}"
            )
        expected = _SIGNATURES[sam_type]
        if sam_type == "tiny":  # a tiny SAM's input size is its checkpoint's: 16 x its embedding grid
            expected = (*expected[:2], sig[2])
        if sig != expected:
            found = [t for t, s in _SIGNATURES.items() if s == sig or (t == "tiny" and s[:2] == sig[:2])]
            guess = f"it looks like --sam_type {found[0]}" if found else "it matches no known type"
            raise BackboneError(
                f"checkpoint {str(path)!r} does not fit --sam_type {sam_type}: image encoder "
                f"width/depth/grid {sig}, expected {expected}; {guess}"
            )

    if sam_type == "tiny":
        sam = build_tiny_sam(16 * sig[2]) if state is not None else build_tiny_sam()
    else:
        sam = sam_model_registry[sam_type](checkpoint=None)
    return frozen_with_weights(sam, state, checkpoint, sam_type)


class SamTransform:
    """SAM's input transform, without the model: picklable, so DataLoader workers can use it.

    ``resize`` is ``SamPredictor.set_image``'s resize (``ResizeLongestSide.apply_image``, PIL) and
    stays uint8, so an image crosses to the device at a quarter of float32's bytes;
    ``normalize_and_pad`` is ``Sam.preprocess`` (SAM's pixel mean/std, zero padding bottom/right
    to a square) and runs wherever its input lives. ``__call__`` does both. ``apply_boxes`` and
    ``apply_coords`` are ``SamPredictor``'s prompt transform. (A ``SegmenterTransform``.)
    """

    def __init__(self, image_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> None:
        self.image_size = image_size
        self.resizer = ResizeLongestSide(image_size)
        self.pixel_mean = pixel_mean.detach().to("cpu", torch.float32).reshape(3, 1, 1)
        self.pixel_std = pixel_std.detach().to("cpu", torch.float32).reshape(3, 1, 1)

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, h, w] uint8 with the longest side ``image_size``."""
        check_rgb_uint8(image, "SAM")
        return torch.as_tensor(self.resizer.apply_image(image)).permute(2, 0, 1).contiguous()

    def normalize_and_pad(self, resized: torch.Tensor) -> torch.Tensor:
        """[3, h, w] uint8 from ``resize`` -> [3, image_size, image_size] float32, same device."""
        mean = self.pixel_mean.to(resized.device)
        std = self.pixel_std.to(resized.device)
        x = (resized.float() - mean) / std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, image_size, image_size] float32 (``resize`` then ``normalize_and_pad``)."""
        return self.normalize_and_pad(self.resize(image))

    def unpadded_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an (H, W) image inside the padded square, as SamPredictor's input_size."""
        return ResizeLongestSide.get_preprocess_shape(image_size[0], image_size[1], self.image_size)

    def apply_boxes(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[N, 4] xyxy in pixels of an (H, W) image -> SAM's input frame."""
        return self.resizer.apply_boxes_torch(boxes, image_size)

    def apply_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[..., 2] x, y in pixels of an (H, W) image -> SAM's input frame."""
        return self.resizer.apply_coords_torch(coords, image_size)
