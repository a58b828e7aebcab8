"""Frozen SAM: building it from a checkpoint, and the batched per-prompt region encoder.

RegionSpot's position-aware region token is the output of SAM's mask decoder two-way transformer
for the first mask token (the one SAM uses when ``multimask_output=False``). The same decoder call
also gives the prompted mask, which mask AP is computed from. Prompts are boxes (training,
extraction, test), points with labels, or both (the predictor), as ``SamPredictor`` takes them.
Everything here is SAM's own code (``segment_anything``); this module only builds, loads and batches it.
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

from .common import BackboneError, BackboneNotFoundError

SAM_TYPES = ("vit_b", "vit_l", "vit_h", "tiny")

OFFICIAL_SAM_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
    "tiny": "sam_tiny.pth",
}

# The tiny SAM is for tests and CPU smoke runs: SAM's own classes at a toy size. The checkpoint
# holds only a state dict, so these constants are what makes it loadable again; change them and
# every sam_tiny.pth written before no longer fits. The 512 input keeps it fast enough for the
# test suite on a small CPU (all boxes of an image batched); the prompt encoder and mask decoder are SAM's
# standard ones, so the region token is 256-d exactly as with the real models.
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


def build_tiny_sam() -> Sam:
    """A randomly initialised tiny SAM (``TINY_SAM_CONFIG``), built like ``_build_sam``."""
    prompt_embed_dim = 256
    image_size = int(TINY_SAM_CONFIG["image_size"])
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
        raise BackboneError(f"unknown --sam-type {sam_type!r}; choose one of {', '.join(SAM_TYPES)}")
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
                f"SAM checkpoint {str(path)!r} not found; --sam-type {sam_type} expects the "
                f"official file {official} ({hint}) and its path in --sam-checkpoint"
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
                f"checkpoint {str(path)!r} does not fit --sam-type {sam_type}: it is not a SAM "
                f"state dict (no 'image_encoder.pos_embed'); expected the official {official}"
            )
        if sig != _SIGNATURES[sam_type]:
            found = [t for t, s in _SIGNATURES.items() if s == sig]
            guess = f"it looks like --sam-type {found[0]}" if found else "it matches no known type"
            raise BackboneError(
                f"checkpoint {str(path)!r} does not fit --sam-type {sam_type}: image encoder "
                f"width/depth/grid {sig}, expected {_SIGNATURES[sam_type]}; {guess}"
            )

    sam = build_tiny_sam() if sam_type == "tiny" else sam_model_registry[sam_type](checkpoint=None)
    if state is not None:
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise BackboneError(f"checkpoint {str(checkpoint)!r} does not fit --sam-type {sam_type}: {err}") from err
    sam.eval()
    sam.requires_grad_(False)
    return sam


class SamTransform:
    """SAM's input transform, without the model: picklable, so DataLoader workers can use it.

    ``resize`` is ``SamPredictor.set_image``'s resize (``ResizeLongestSide.apply_image``, PIL) and
    stays uint8, so an image crosses to the device at a quarter of float32's bytes;
    ``normalize_and_pad`` is ``Sam.preprocess`` (SAM's pixel mean/std, zero padding bottom/right
    to a square) and runs wherever its input lives. ``__call__`` does both.
    """

    def __init__(self, img_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> None:
        self.img_size = img_size
        self.resizer = ResizeLongestSide(img_size)
        self.pixel_mean = pixel_mean.detach().to("cpu", torch.float32).reshape(3, 1, 1)
        self.pixel_std = pixel_std.detach().to("cpu", torch.float32).reshape(3, 1, 1)

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, h, w] uint8 with the longest side ``img_size``."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            shape = getattr(image, "shape", type(image).__name__)
            raise ValueError(f"SAM preprocess expects an HxWx3 RGB numpy array, got {shape}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"SAM preprocess expects uint8 pixels in [0, 255], got {image.dtype}; "
                "read images with regionspot_pl.backbones.image.read_image"
            )
        return torch.as_tensor(self.resizer.apply_image(image)).permute(2, 0, 1).contiguous()

    def normalize_and_pad(self, resized: torch.Tensor) -> torch.Tensor:
        """[3, h, w] uint8 from ``resize`` -> [3, img_size, img_size] float32, same device."""
        mean = self.pixel_mean.to(resized.device)
        std = self.pixel_std.to(resized.device)
        x = (resized.float() - mean) / std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, img_size, img_size] float32 (``resize`` then ``normalize_and_pad``)."""
        return self.normalize_and_pad(self.resize(image))

    def input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of an (H, W) image inside the padded square, as SamPredictor's input_size."""
        return ResizeLongestSide.get_preprocess_shape(image_size[0], image_size[1], self.img_size)


class SamRegionEncoder(nn.Module):
    """Frozen SAM turned into a batched region encoder: image -> embedding, boxes -> tokens+masks.

    Attributes:
        img_size: SAM's square input side (1024 for the official models, 512 for ``tiny``).
        transform: the picklable ``SamTransform`` that ``preprocess`` uses; hand it to
            DataLoader workers instead of this module (which holds the weights).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam
        self.img_size: int = int(sam.image_encoder.img_size)
        self.transform = SamTransform(self.img_size, sam.pixel_mean, sam.pixel_std)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, img_size, img_size] float32, on the CPU (see ``SamTransform``)."""
        return self.transform(image)

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed images -> [B, 256, S/16, S/16] image embeddings."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.img_size, self.img_size):
            raise ValueError(
                f"encode_images expects [B, 3, {self.img_size}, {self.img_size}] from preprocess(), "
                f"got {tuple(batch.shape)}"
            )
        return self.sam.image_encoder(batch.to(self.sam.device))

    @torch.no_grad()
    def prepare(self, resized: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, h, w] images from ``transform.resize`` -> [B, 3, S, S] float32 on SAM's
        device: moved as uint8, normalized and padded there."""
        device = self.sam.device
        return torch.stack([self.transform.normalize_and_pad(r.to(device, non_blocking=True)) for r in resized])

    @torch.no_grad()
    def encode_boxes(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor,
        image_size: tuple[int, int],
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region tokens and box-prompted masks for all boxes of one image, as ``SamPredictor``
        gives them for the image it was set to.

        Args:
            image_embedding: [256, h, w], one image's output of ``encode_images``.
            boxes: [N, 4] xyxy in the pixels of the image SAM was given (in this package the
                resized image of :mod:`regionspot_pl.backbones.image`).
            image_size: (H, W) of that image.
            chunk_size: boxes per decoder call; None = all N in one call. The decoder repeats
                the image embedding per box, so bound this for memory with hundreds of boxes.

        Returns:
            tokens: [N, 256] float32, the two-way transformer's output for the first mask token
                (``hs[:, 1]``; index 0 is the iou token).
            masks: [N, H, W] bool, the ``multimask_output=False`` mask at ``image_size``
                (SAM's ``postprocess_masks``, threshold 0).
        """
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be [N, 4] xyxy pixels, got {tuple(boxes.shape)}")
        tokens, masks, _ = self.encode_prompts(image_embedding, image_size, boxes=boxes, chunk_size=chunk_size)
        return tokens, masks

    @torch.no_grad()
    def encode_boxes_batch(
        self,
        image_embeddings: torch.Tensor,
        boxes: list[torch.Tensor],
        image_sizes: list[tuple[int, int]],
        max_boxes_per_call: int = 256,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``encode_boxes`` for the boxes of several images, in as few decoder calls as
        ``max_boxes_per_call`` allows (one per image would leave a GPU mostly idle).

        SAM's decoder adds the image embedding to each prompt's dense embedding
        (``src = repeat(image) + dense``); giving it a zero image and ``dense + image`` per box
        computes the same sum, so boxes of different images share one call. Each box's math is
        unchanged (equal to ``encode_boxes`` up to float rounding).

        Args:
            image_embeddings: [B, 256, h, w] from ``encode_images``.
            boxes: B tensors [N_b, 4], xyxy in the pixels of image b (as ``encode_boxes``).
            image_sizes: B (H, W) of the images SAM was given.
            max_boxes_per_call: boxes per decoder call (each costs 256 x h x w floats).

        Returns:
            B pairs (tokens [N_b, 256] float32, masks [N_b, H_b, W_b] bool).
        """
        if not (len(boxes) == len(image_sizes) == image_embeddings.shape[0]):
            raise ValueError(
                f"{image_embeddings.shape[0]} embeddings, {len(boxes)} box sets and "
                f"{len(image_sizes)} sizes: give one of each per image"
            )
        sam, device = self.sam, self.sam.device
        owner = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
        prompts = torch.cat(
            [
                self.transform.resizer.apply_boxes_torch(b.to(device, torch.float32).reshape(-1, 4), size)
                for b, size in zip(boxes, image_sizes)
            ]
        )
        tokens, low_res = [], []
        for start in range(0, len(owner), max(1, int(max_boxes_per_call))):
            index = owner[start : start + max_boxes_per_call].to(device)
            sparse, dense = sam.prompt_encoder(
                points=None, boxes=prompts[start : start + max_boxes_per_call], masks=None
            )
            hs, masks, _iou = self._decoder(
                torch.zeros_like(image_embeddings[:1]).to(device), sparse,
                dense + image_embeddings.to(device)[index], multimask_output=False,
            )  # fmt: skip
            tokens.append(hs[:, 1].float())
            low_res.append(masks)
        tokens_all = torch.cat(tokens) if tokens else torch.zeros(0, 256, device=device)
        low_all = torch.cat(low_res) if low_res else None
        results = []
        for i, size in enumerate(image_sizes):
            rows = (owner == i).nonzero().flatten().to(device)
            if len(rows) == 0:
                results.append((tokens_all[:0], torch.zeros(0, *size, dtype=torch.bool, device=device)))
                continue
            up = sam.postprocess_masks(low_all[rows], self.transform.input_size(size), size)
            results.append((tokens_all[rows], up[:, 0] > sam.mask_threshold))
        return results

    @torch.no_grad()
    def encode_prompts(
        self,
        image_embedding: torch.Tensor,
        image_size: tuple[int, int],
        boxes: torch.Tensor | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        multimask_output: bool = False,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region tokens, masks and predicted IoUs for N prompts of one image, each a box,
        points, or both, exactly as ``SamPredictor.predict_torch`` prompts SAM.

        Args:
            image_embedding: [256, h, w], one image's output of ``encode_images``.
            image_size: (H, W) of the image SAM was given; prompts are in its pixels.
            boxes: [N, 4] xyxy, or None.
            point_coords: [N, K, 2] x, y (K points per prompt, the same K for all N), or None.
            point_labels: [N, K], 1 foreground, 0 background (SAM also reads -1 as padding).
            multimask_output: SAM's three candidate masks per prompt instead of one.
            chunk_size: prompts per decoder call; None = all N in one call.

        Returns:
            tokens: [N, 256] the first mask token's output ``hs[:, 1]``, or with
                ``multimask_output`` [N, 3, 256] the three multimask tokens ``hs[:, 2:5]``
                (``hs[:, 0]`` is the iou token); float32.
            masks: [N, H, W] bool, or [N, 3, H, W] with ``multimask_output``.
            iou: [N] SAM's predicted IoU of each mask, or [N, 3]; float32.
        """
        if image_embedding.ndim != 3:
            raise ValueError(
                f"encode_prompts expects one image's embedding [256, h, w], got "
                f"{tuple(image_embedding.shape)}; index the batch from encode_images"
            )
        n = _check_prompts(boxes, point_coords, point_labels)
        device = self.sam.device
        height, width = int(image_size[0]), int(image_size[1])
        if n == 0:
            extra = (3,) if multimask_output else ()
            dim = self.sam.mask_decoder.transformer_dim
            return (
                torch.zeros(0, *extra, dim, device=device),
                torch.zeros(0, *extra, height, width, dtype=torch.bool, device=device),
                torch.zeros(0, *extra, device=device),
            )
        step = n if chunk_size is None else max(1, int(chunk_size))

        def part(x: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if x is None else x[i : i + step]

        parts = [
            self._decode(
                image_embedding, (height, width), part(boxes, i), part(point_coords, i),
                part(point_labels, i), multimask_output,
            )
            for i in range(0, n, step)
        ]  # fmt: skip
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))

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

    def _decode(
        self,
        image_embedding: torch.Tensor,
        image_size: tuple[int, int],
        boxes: torch.Tensor | None,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched prompt-encoder + mask-decoder call for n prompts (see ``encode_prompts``)."""
        sam = self.sam
        device = sam.device
        resizer = self.transform.resizer
        if boxes is not None:
            boxes = resizer.apply_boxes_torch(boxes.to(device, torch.float32), image_size)
        points = None
        if point_coords is not None:
            coords = resizer.apply_coords_torch(point_coords.to(device, torch.float32), image_size)
            points = (coords, point_labels.to(device, torch.int))
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)

        hs, low_res, iou = self._decoder(image_embedding.unsqueeze(0).to(device), sparse, dense, multimask_output)
        # token i+1 of hs is mask output i; multimask answers with mask outputs 1..3
        tokens = (hs[:, 2:5] if multimask_output else hs[:, 1]).float()
        masks = sam.postprocess_masks(low_res, self.transform.input_size(image_size), image_size)
        masks = masks > sam.mask_threshold
        if not multimask_output:
            masks, iou = masks[:, 0], iou[:, 0]
        return tokens, masks, iou.float()


def _check_prompts(
    boxes: torch.Tensor | None,
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
) -> int:
    """Shapes of one batch of SAM prompts; returns the number of prompts N."""
    if boxes is None and point_coords is None:
        raise ValueError("give boxes, point_coords (with point_labels), or both")
    if boxes is not None and (boxes.ndim != 2 or boxes.shape[1] != 4):
        raise ValueError(f"boxes must be [N, 4] xyxy pixels, got {tuple(boxes.shape)}")
    if point_coords is not None:
        if point_coords.ndim != 3 or point_coords.shape[2] != 2:
            raise ValueError(f"point_coords must be [N, K, 2] x, y pixels, got {tuple(point_coords.shape)}")
        if point_labels is None or tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            got = None if point_labels is None else tuple(point_labels.shape)
            raise ValueError(f"point_labels must be [N, K] = {tuple(point_coords.shape[:2])}, got {got}")
    elif point_labels is not None:
        raise ValueError("point_labels given without point_coords")
    n = boxes.shape[0] if boxes is not None else point_coords.shape[0]
    if boxes is not None and point_coords is not None and point_coords.shape[0] != n:
        raise ValueError(f"{n} boxes but {point_coords.shape[0]} point prompts: give one of each per region")
    return int(n)
