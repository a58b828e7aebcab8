"""FLOPs: what the GPU goals ask of the hardware, counted (a measured rate needs a GPU)."""

from __future__ import annotations

import numpy as np
import torch

from .bl_shards import bl_batch
from .common import BL, EXTRACT_TARGET, H100_BF16_SPEC, TRAIN_TARGET, Table, counted_gflop
from .train_stage import bl_head_and_texts, clip_vit_l14, head_step


def backbone_gflops(boxes: int = 16) -> tuple[float, float, float]:
    """(SAM ViT-B@1024 image encoder per image, its prompt + mask decoder per box, CLIP ViT-L/14@224
    per image) in GFLOP, counted by torch's FlopCounterMode (matmuls and convolutions, 2 per
    multiply-add) on the meta device: shapes only, no compute."""
    from segment_anything import sam_model_registry

    with torch.device("meta"), torch.no_grad():
        sam = sam_model_registry["vit_b"](checkpoint=None).eval().requires_grad_(False)
        sam_enc = counted_gflop(lambda: sam.image_encoder(torch.empty(1, 3, 1024, 1024)))
        box_xyxy = torch.empty(boxes, 4)

        def decode():
            sparse, dense = sam.prompt_encoder(points=None, boxes=box_xyxy, masks=None)
            sam.mask_decoder(torch.empty(1, 256, 64, 64), sam.prompt_encoder.get_dense_pe(), sparse, dense, False)

        per_box = counted_gflop(decode) / boxes
        clip = counted_gflop(lambda: clip_vit_l14().requires_grad_(False)(pixel_values=torch.empty(1, 3, 224, 224)))
    return sam_enc, per_box, clip


def bench_flops(table: Table, head_batch: int = 16) -> dict:
    """FLOPs of real-size SAM ViT-B, CLIP ViT-L/14 (``backbone_gflops``) and the BL head step
    (counted while it runs for real, on a batch of ``head_batch`` images)."""
    boxes = BL["boxes"]
    sam_enc, per_box, clip = backbone_gflops()
    per_image = sam_enc + clip + boxes * per_box
    head, optimizer, texts = bl_head_and_texts()
    batch = bl_batch(np.random.default_rng(2), head_batch)
    head_per_image = counted_gflop(lambda: head_step(head, optimizer, batch, texts)) / head_batch

    _demand_row(
        table, "flops: SAM ViT-B@1024 encoder + CLIP ViT-L/14@224 + 16 boxes' decoder (counted)",
        f"{per_image:.0f} GFLOP/img ({sam_enc:.0f} + {clip:.0f} + 16 x {per_box:.1f})", per_image, EXTRACT_TARGET,
        "{:.0f}%", sam_encoder_gflop=sam_enc, clip_gflop=clip, decoder_gflop_per_box=per_box,
    )  # fmt: skip
    _demand_row(
        table, "flops: BL head training step (fwd + bwd, 16 boxes, 365 classes, counted)",
        f"{head_per_image:.1f} GFLOP/img", head_per_image, TRAIN_TARGET, "{:.1f}%", head_gflop_per_image=head_per_image,
    )  # fmt: skip
    return {"extract_gflop_per_image": per_image, "head_gflop_per_image": head_per_image}


def _demand_row(
    table: Table, name: str, counted: str, gflop_per_image: float, target_rate: int, ratio_fmt: str, **raw: float
) -> None:
    """One row: the counted GFLOP per image, the TFLOP/s the target rate needs, and that as a
    share of the H100's bf16 spec."""
    need = target_rate * gflop_per_image / 1e3
    table.add(
        name, counted, f"at {target_rate} img/s: {need:.0f} TFLOP/s", 100 * need / H100_BF16_SPEC,
        ratio_fmt=ratio_fmt, target="of H100 bf16 spec", **raw,
    )  # fmt: skip
