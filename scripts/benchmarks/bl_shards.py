"""Synthetic RegionSpot-BL shards: what extracting O365 with SAM ViT-B + CLIP ViT-L/14 writes, or
the same for another CLIP's token count and width."""

from __future__ import annotations

import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from regionspot_pl.cache.manifest import ClipBackbone, Manifest, SamBackbone
from regionspot_pl.cache.shards import AtomicShardWriter, ShardFormatError, decode_sample, encode_sample, shard_name
from regionspot_pl.data.annotations import Vocabulary
from regionspot_pl.train.datamodule import RegionBatch, collate_regions

from .common import BL

# the shards' CLIP when no real folder stands behind them (the reader and the head need only its sizes)
BL_CLIP = ClipBackbone("synthetic ViT-L/14", "synthetic", 224, BL["tokens"], BL["clip_dim"], BL["text_dim"], 100.0)
SAM_TOKEN_DIM = 256


def bl_sample(
    rng: np.random.Generator, image_id: int, clip: ClipBackbone = BL_CLIP, classes: int = BL["classes"]
) -> dict:
    """One encoded sample: ~16 boxes (Poisson) of ``classes`` classes, SAM tokens [N, 256] and CLIP
    tokens [T, D] in float16."""
    n = max(1, int(rng.poisson(BL["boxes"])))
    xy = rng.uniform(0, 400, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 200, size=(n, 2))], axis=1).astype(np.float32)
    return encode_sample(
        image_id,
        rng.standard_normal((n, SAM_TOKEN_DIM)).astype(np.float16),
        boxes,
        rng.integers(0, classes, n),
        np.ones(n, np.float32),
        rng.standard_normal((clip.tokens, clip.vision_dim)).astype(np.float16),
        {"file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480, "dataset": "bl"},
        iou=rng.uniform(0.5, 1.0, n).astype(np.float32),
    )


def sample_bytes(clip: ClipBackbone = BL_CLIP) -> int:
    """Bytes of one sample's token arrays (16 boxes), what a cache's size is counted in."""
    return 2 * (clip.tokens * clip.vision_dim + BL["boxes"] * SAM_TOKEN_DIM)


def bl_batch(rng: np.random.Generator, size: int) -> RegionBatch:
    """A training batch of ``size`` BL samples, collated as the shard reader collates them."""
    return collate_regions([decode_sample(bl_sample(rng, i + 1)) | {"dataset_index": 0} for i in range(size)])


def _write_shard(folder: Path, index: int, first_id: int, count: int, clip: ClipBackbone, classes: int) -> None:
    rng = np.random.default_rng([0, index])  # each shard its own stream: any process writes it alike
    writer = AtomicShardWriter(folder / shard_name("bl", 0, index))
    for image_id in range(first_id, first_id + count):
        writer.write(bl_sample(rng, image_id, clip, classes))
    writer.commit({"num_classes": classes})


def write_bl_shards(
    folder: Path, num_images: int, shard_size: int = 32, clip: ClipBackbone = BL_CLIP, text_cache: str = "",
    processes: int = 1, classes: int = BL["classes"],
) -> Path:  # fmt: skip
    """``num_images`` samples of ``clip``'s sizes and ``classes`` classes (O365's 365 by default) in
    shards with a manifest, as extraction leaves them, written by ``processes`` processes; kept for
    reruns of the same size, CLIP and vocabulary."""
    try:
        old = Manifest.read(folder)
        same_vocabulary = len(old.vocabulary) == classes and old.text_cache == text_cache
        if old.config.get("images") == num_images and old.clip == clip and same_vocabulary:
            return folder
    except ShardFormatError:
        pass  # none yet, or of an older format or protocol: write them again
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    starts = range(0, num_images, shard_size)
    jobs = [
        (folder, j, start + 1, min(shard_size, num_images - start), clip, classes) for j, start in enumerate(starts)
    ]
    if processes > 1:  # the numpy work of the samples in forked processes, each writing whole shards
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_shard, *zip(*jobs)))
    else:
        for job in jobs:
            _write_shard(*job)
    vocab = Vocabulary(tuple(f"class_{i}" for i in range(classes)), tuple(range(1, classes + 1)))
    sam = SamBackbone("synthetic", "none", "synthetic", 1024)
    Manifest(
        vocab, sam, clip, text_cache=text_cache, precision="fp16", dataset="bl",
        config={"masks": False, "images": num_images},
    ).write(folder)  # fmt: skip
    return folder
