"""Extraction's inputs, checked before the backbones load, and the plan of this rank's shards.

Everything here runs in seconds, so a bad flag, path, annotation file or image folder fails before
minutes of model loading, naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import h5py

from ..backbones.build import official_checkpoint
from ..backbones.common import resolve_device
from ..backbones.image import ImageReadError, resolve_image_path
from ..data.annotations import Vocabulary
from ..data.records import ImageRecord, ReadStats, load_coco
from .resume import previous_manifest
from .settings import ExtractConfig, ExtractError

log = logging.getLogger("regionspot_pl.extract")
PREFLIGHT_IMAGES = 16  # the first images of the plan looked up before the backbones are loaded


def plan_shards(records: list[ImageRecord], rank: int, world_size: int, shard_size: int) -> list[list[ImageRecord]]:
    """This rank's images (every world_size-th by id), grouped into shards in order."""
    mine = sorted(records, key=lambda r: r.image_id)[rank::world_size]
    return [mine[i : i + shard_size] for i in range(0, len(mine), shard_size)]


# (field, "file" or "folder") of every input path
_INPUT_PATHS = (
    ("images", "folder"),
    ("annotations", "file"),
    ("boxes", "file"),
    ("sam_checkpoint", "file"),
    ("clip_model", "folder"),
)


def _check_paths(cfg: ExtractConfig) -> None:
    """Every input path exists and is of its kind; ``--out`` and ``--text_cache`` can be written."""
    for key, kind in _INPUT_PATHS:
        value = getattr(cfg, key)
        if value is None:
            continue
        path = Path(value)
        if path.is_dir() if kind == "folder" else path.is_file():
            continue
        problem = f"is not a {kind}" if path.exists() else "not found"
        if key == "sam_checkpoint" and official_checkpoint(cfg.sam_type):
            problem += f" (--sam_type {cfg.sam_type} takes the official {official_checkpoint(cfg.sam_type)})"
        raise ExtractError(f"--{key} {value}: {problem}; pass the right path as --{key} or `{key}:` in a --config file")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ExtractError(f"--out {cfg.out} is a file, not a folder: pass another --out")
    cache = Path(cfg.text_cache)
    if cache.exists() and not (cache.is_file() and h5py.is_hdf5(cache)):
        raise ExtractError(f"--text_cache {cache} is not an HDF5 file: pass another --text_cache, or delete it")


def _plan(cfg: ExtractConfig) -> tuple[list[list[ImageRecord]], Vocabulary, ReadStats]:
    """Read the annotations and plan this rank's shards; returns (shards, vocabulary, read stats)."""
    records, vocab, read_stats = load_coco(cfg.annotations, cfg.boxes)
    if read_stats.images_outside:
        log.warning(
            "%d images dropped: their file_name leads outside --images (e.g. %s)",
            read_stats.images_outside,
            ", ".join(map(repr, read_stats.outside_examples)),
        )
    if cfg.limit is not None:
        records = sorted(records, key=lambda r: r.image_id)[: cfg.limit]
        labelled = sum(int((r.labels >= 0).sum()) for r in records)
        if cfg.boxes is None and labelled == 0:
            raise ExtractError(
                f"the first {cfg.limit} images of {cfg.annotations} (--limit) hold no box with a class: raise --limit"
            )
    shards = plan_shards(records, cfg.rank, cfg.world_size, cfg.shard_size)
    if not shards:
        raise ExtractError(
            f"rank {cfg.rank} of {cfg.world_size} gets no image ({len(records)} images in all): "
            "use a --world_size of at most the number of images"
        )
    _preflight_images(cfg, [rec for shard in shards for rec in shard][:PREFLIGHT_IMAGES])
    return shards, vocab, read_stats


def _preflight_images(cfg: ExtractConfig, first: list[ImageRecord]) -> None:
    """The first images of the plan must be found: when none is, --images is the wrong folder,
    and every image would be skipped one by one after the backbones have loaded."""
    found = 0
    for rec in first:
        try:
            found += resolve_image_path(cfg.images, rec.file_name).is_file()
        except ImageReadError:
            pass
    if first and not found:
        raise ExtractError(
            f"none of the first {len(first)} images of {cfg.annotations} is under --images {cfg.images} "
            f"(e.g. {Path(cfg.images) / first[0].file_name}): pass the folder their file_names are relative to"
        )


def checked_plan(cfg: ExtractConfig) -> tuple[ExtractConfig, list[list[ImageRecord]], Vocabulary, ReadStats]:
    """The settings (with their dataset name) and the plan, every input checked."""
    cfg.check()
    cfg = dataclasses.replace(cfg, dataset=cfg.dataset or Path(cfg.annotations).stem)
    _check_paths(cfg)
    resolve_device(cfg.device)
    previous_manifest(Path(cfg.out))
    shards, vocab, read_stats = _plan(cfg)
    return cfg, shards, vocab, read_stats


# --------------------------------------------------------------------------------------------
