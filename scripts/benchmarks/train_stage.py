"""Training: the RegionSpot-BL head (clip_dim 1024, text_dim 768, T = 257, ~16 boxes per image,
batch 16 unless told, fp32, AdamW step) from features in memory and through the shard reader, against
running a real-size CLIP ViT-L/14 vision tower (and SAM ViT-B's image encoder) per batch as the
reference does."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from regionspot_pl.backbones.common import autocast_for
from regionspot_pl.model import RegionSpotHead, region_focal_loss, region_logits
from regionspot_pl.train.datamodule import DataConfig, RegionDataModule

from .bl_shards import bl_batch
from .common import BL, CLIP_L14_VISION, Table, now, sync


def clip_vit_l14():
    """CLIP ViT-L/14's vision tower at 224 with random weights (speed does not depend on them)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_VISION)).eval()


def bl_head_and_texts(seed: int = 0) -> tuple[RegionSpotHead, torch.optim.Optimizer, torch.Tensor]:
    """The BL head in training mode, its AdamW, and random unit text embeddings of BL's classes."""
    torch.manual_seed(seed)
    head = RegionSpotHead.from_variant("BL").train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=2.5e-5, weight_decay=1e-4)
    texts = torch.nn.functional.normalize(torch.randn(BL["classes"], BL["text_dim"]), dim=-1)
    return head, optimizer, texts


def head_step(head: RegionSpotHead, optimizer: torch.optim.Optimizer, batch, texts: torch.Tensor) -> float:
    """One training step as RegionSpotModule + Lightning do it: forward, focal loss, backward,
    gradient clipping at 1.0, AdamW step."""
    regions = head(batch.sam, batch.clip, padding_mask=batch.padding_mask)
    loss = region_focal_loss(region_logits(regions, texts), batch.labels, batch.valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def device_step_rate(device: torch.device, precision: str, batch: int, steps: int, warm_up: int) -> float:
    """Images/s of the BL head step on batches already in device memory, under ``precision``'s
    autocast (fp16 without a GradScaler: a speed measurement only): the device's own ceiling."""
    rng = np.random.default_rng(0)
    head, optimizer, texts = bl_head_and_texts()
    head, texts = head.to(device), texts.to(device)  # Module.to keeps the parameters the optimizer holds
    batches = [bl_batch(rng, batch).to(device) for _ in range(4)]
    with autocast_for(device, precision):
        for i in range(warm_up):
            head_step(head, optimizer, batches[i % 4], texts)
        sync(device)
        start = now()
        for i in range(steps):
            head_step(head, optimizer, batches[i % 4], texts)
        sync(device)
    return batch * steps / (now() - start)


def cached_rates(bl_folder: Path, steps: int, batch_size: int) -> tuple[float, float]:
    """(img/s from batches in memory, img/s through the shard reader with 2 decoding workers);
    the two alternate step by step so that other load falls on both alike."""
    head, optimizer, texts = bl_head_and_texts()
    rng = np.random.default_rng(1)
    batches = [bl_batch(rng, batch_size) for _ in range(2)]
    config = DataConfig([str(bl_folder)], batch_size=batch_size, workers=2, shuffle_buffer=64)
    dm = RegionDataModule(config, seed=0)
    loader = iter(dm.train_dataloader())
    head_step(head, optimizer, batches[0], texts)  # warm-up
    head_step(head, optimizer, next(loader), texts)  # warm-up (worker start-up)
    memory_s, shard_s, images = 0.0, 0.0, 0
    for i in range(steps):
        start = now()
        head_step(head, optimizer, batches[i % 2], texts)
        memory_s += now() - start
        start = now()
        batch = next(loader)
        head_step(head, optimizer, batch, texts)
        shard_s += now() - start
        images += len(batch.meta)
    del loader
    gc.collect()
    return batch_size * steps / memory_s, images / shard_s


def clip_on_the_fly_s(batches: int) -> tuple[float, float]:
    """(seconds per image of CLIP ViT-L/14's forward + the head step at batch 2, of which CLIP)."""
    head, optimizer, texts = bl_head_and_texts()
    vision = clip_vit_l14()
    small = bl_batch(np.random.default_rng(1), 2)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vision(pixel_values=pixels[:1])  # warm-up at batch 1 (cheaper)
    clip_s, head_s = 0.0, 0.0
    for _ in range(batches):
        start = now()
        with torch.no_grad():
            small.clip = vision(pixel_values=pixels).last_hidden_state
        clip_s += now() - start
        start = now()
        head_step(head, optimizer, small, texts)
        head_s += now() - start
    del vision
    gc.collect()
    return (clip_s + head_s) / (2 * batches), clip_s / (2 * batches)


def sam_encoder_s() -> float:
    """Seconds of SAM ViT-B@1024's image encoder on one image (random weights)."""
    from segment_anything import sam_model_registry

    encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval()
    with torch.no_grad():
        start = now()
        encoder(torch.randn(1, 3, 1024, 1024))
        seconds = now() - start
    del encoder
    gc.collect()
    return seconds


def bench_training(
    table: Table, bl_folder: Path, steps: int, on_the_fly_batches: int, with_sam: bool, batch_size: int = 16
) -> dict:
    """The BL head's rows; CLIP (and SAM, ``with_sam``) on the fly unless ``on_the_fly_batches`` is 0."""
    cached, from_shards = cached_rates(bl_folder, steps, batch_size)
    result = {"cached": cached, "shards": from_shards}
    if on_the_fly_batches:
        per_image, clip_s = clip_on_the_fly_s(on_the_fly_batches)
        table.add(
            "train: BL head, cached features in memory vs CLIP ViT-L/14 on the fly",
            f"{cached:.1f} img/s (batch {batch_size}, ~16 boxes, T 257, fp32, AdamW)",
            f"{1 / per_image:.2f} img/s (CLIP fwd {1000 * clip_s:.0f} ms/img + head)",
            cached * per_image,
            images_per_s=cached, on_the_fly_images_per_s=1 / per_image, clip_ms_per_image=1000 * clip_s,
        )  # fmt: skip
        result["clip_fly"] = 1 / per_image
    table.add(
        "train: BL head through the shard reader (workers 2) vs in memory"
        + ("" if batch_size == 16 else f", batch {batch_size}"),
        f"{from_shards:.1f} img/s",
        f"{cached:.1f} img/s (in memory)",
        100 * from_shards / cached,
        ratio_fmt="{:.0f}%",
        target=">= 90%",
        met=from_shards >= 0.9 * cached,
        images_per_s=from_shards,
    )
    if on_the_fly_batches and with_sam:
        sam_s = sam_encoder_s()
        full_fly = 1 / (per_image + sam_s)
        table.add(
            "train: BL head, cached vs SAM ViT-B@1024 + CLIP ViT-L/14 on the fly",
            f"{cached:.1f} img/s",
            f"{full_fly:.3f} img/s (SAM fwd {sam_s:.1f} s/img)",
            cached / full_fly,
            ratio_fmt="{:.0f}x",
            on_the_fly_images_per_s=full_fly,
            sam_s_per_image=sam_s,
        )
        result["full_fly"] = full_fly
    return result
