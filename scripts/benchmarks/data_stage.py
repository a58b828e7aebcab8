"""The inputs of the extraction, loading and evaluation stages: demo images, tiny random
backbones, and their shards extracted through ``run_extraction`` (manifest + text cache), as the
CLI writes them. Everything is kept under the output folder for reruns."""

from __future__ import annotations

import shutil
from pathlib import Path

from regionspot_pl.backbones.tiny import write_tiny_backbones
from regionspot_pl.cache.manifest import MANIFEST, Manifest
from regionspot_pl.cache.shards import ShardFormatError
from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.extract.run import ExtractConfig, run_extraction

from .extract_stage import BATCH


def demo_inputs(out: Path, num_train: int, num_val: int) -> tuple[dict, dict]:
    """(the demo set's paths, the tiny backbones' paths) under ``out``."""
    data = generate_demo_dataset(out / "data", num_train=num_train, num_val=num_val, seed=0)
    return data, write_tiny_backbones(out / "backbones")


def demo_shards(out: Path, data: dict, backbones: dict, split: str, num_images: int, shard_size: int) -> Path:
    """The first ``num_images`` of the ``split`` in shards in ``out/shards/{split}-{num_images}``,
    extracted unless already there."""
    folder = out / "shards" / f"{split}-{num_images}"
    try:
        Manifest.read(folder)
    except ShardFormatError:  # features of an older format or protocol: extract again
        shutil.rmtree(folder, ignore_errors=True)
    if not (folder / MANIFEST).is_file():
        run_extraction(
            ExtractConfig(
                images=str(data[f"{split}_images"]),
                annotations=str(data[f"{split}_json"]),
                out=str(folder),
                sam_checkpoint=str(backbones["sam_checkpoint"]),
                clip_model=str(backbones["clip_dir"]),
                sam_type="tiny",
                dataset=f"demo_{split}",
                shard_size=shard_size,
                batch_size=BATCH,
                workers=0,
                text_cache=str(out / "text_embeddings.h5"),
                limit=num_images,
            )
        )
    return folder
