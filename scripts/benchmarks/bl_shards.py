"""Synthetic RegionSpot-BL shards: what extracting O365 with SAM ViT-B + CLIP ViT-L/14 writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from regionspot_pl.cache.manifest import ClipBackbone, Manifest, SamBackbone
from regionspot_pl.cache.shards import AtomicShardWriter, ShardFormatError, decode_sample, encode_sample, shard_name
from regionspot_pl.data.annotations import Vocabulary
from regionspot_pl.train.datamodule import RegionBatch, collate_regions

from .common import BL


def bl_sample(rng: np.random.Generator, image_id: int) -> dict:
    """One encoded sample: ~16 boxes (Poisson), SAM tokens [N, 256] and CLIP tokens [257, 1024] in float16."""
    n = max(1, int(rng.poisson(BL["boxes"])))
    xy = rng.uniform(0, 400, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 200, size=(n, 2))], axis=1).astype(np.float32)
    return encode_sample(
        image_id,
        rng.standard_normal((n, 256)).astype(np.float16),
        boxes,
        rng.integers(0, BL["classes"], n),
        np.ones(n, np.float32),
        rng.standard_normal((BL["tokens"], BL["clip_dim"])).astype(np.float16),
        {"file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480, "dataset": "bl"},
        iou=rng.uniform(0.5, 1.0, n).astype(np.float32),
    )


def bl_batch(rng: np.random.Generator, size: int) -> RegionBatch:
    """A training batch of ``size`` BL samples, collated as the shard reader collates them."""
    return collate_regions([decode_sample(bl_sample(rng, i + 1)) | {"dataset_index": 0} for i in range(size)])


def write_bl_shards(folder: Path, num_images: int, shard_size: int = 32) -> Path:
    """``num_images`` BL samples in shards with a manifest, as extraction leaves them; kept for reruns."""
    try:
        if Manifest.read(folder).config.get("images") == num_images:
            return folder
    except ShardFormatError:
        pass  # none yet, or of an older format or protocol: write them again
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for j, start in enumerate(range(0, num_images, shard_size)):
        writer = AtomicShardWriter(folder / shard_name("bl", 0, j))
        for image_id in range(start + 1, min(start + shard_size, num_images) + 1):
            writer.write(bl_sample(rng, image_id))
        writer.commit({"num_classes": BL["classes"]})
    vocab = Vocabulary(tuple(f"class_{i}" for i in range(BL["classes"])), tuple(range(1, BL["classes"] + 1)))
    clip = ClipBackbone("synthetic ViT-L/14", "synthetic", 224, BL["tokens"], BL["clip_dim"], BL["text_dim"], 100.0)
    sam = SamBackbone("synthetic", "none", "synthetic", 1024)
    Manifest(
        vocab, sam, clip, text_cache="", precision="fp16", dataset="bl", config={"masks": False, "images": num_images}
    ).write(folder)
    return folder
