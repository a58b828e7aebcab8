"""Offline extraction: frozen SAM + CLIP features of a dataset into WebDataset shards
(:func:`run_extraction`; the command line is :mod:`regionspot_pl.extract.cli`).

Each rank takes every ``world_size``-th image (sorted by id) and groups its images into shards
of ``--shard_size``, in order. A shard's content is therefore a pure function of the inputs:
a rerun skips the shards that exist (they were renamed into place only when complete) and
rewrites the rest identically, so a run killed at any moment loses nothing finished and never
duplicates a sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from ..backbones.build import load_segmenter, load_vlm
from ..backbones.clip import text_embeddings
from ..backbones.encoder import RegionEncoder
from ..cache.shards import (
    AtomicShardWriter,
    read_sidecar,
    shard_counts,
    shard_name,
)
from ..data.records import ImageRecord
from ..utils.io import FolderLock
from .features import FeatureExtractor, ImageFeaturesInput
from .plan import checked_plan
from .resume import build_manifest, check_same_run
from .settings import ExtractConfig, ExtractError

log = logging.getLogger("regionspot_pl.extract")
LOCK = ".extract-r{rank:03d}.lock"


def _collate(items: list[dict]) -> list[dict]:
    return items


def load_extractor(cfg: ExtractConfig) -> FeatureExtractor:
    """SAM and CLIP of ``cfg`` on its device at its precision (compiled with ``--compile``), as
    the extractor of its shards; ``--clip_size`` must be the CLIP model's input size."""
    segmenter = load_segmenter(cfg.sam_type, cfg.sam_checkpoint)
    clip = load_vlm(cfg.clip_model)
    if cfg.clip_size is not None and cfg.clip_size != clip.image_size:
        raise ExtractError(
            f"--clip_size {cfg.clip_size} does not match the CLIP model in {cfg.clip_model}, "
            f"which takes {clip.image_size}x{clip.image_size} input; pass --clip_size "
            f"{clip.image_size} or a CLIP model of that size"
        )
    encoder = RegionEncoder(segmenter, clip, cfg.device, cfg.precision)
    if cfg.compile:
        # SAM's decoder runs once per box: compiling fuses its many small operations
        encoder.compile()
    return FeatureExtractor(encoder, cfg.masks)


# --------------------------------------------------------------------------------------------
# Run: the backbones over this rank's pending shards
# --------------------------------------------------------------------------------------------


def run_extraction(cfg: ExtractConfig) -> dict:
    """Extract features for this rank's images; returns the run summary.

    The rank's part of ``--out`` is locked for the run (``.extract-rNNN.lock``, holding the pid
    and host): a second extraction of the same rank into the same folder is refused.
    """
    start = time.time()
    cfg, shards, vocab, read_stats = checked_plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out / LOCK.format(rank=cfg.rank), f"extraction folder {out} (rank {cfg.rank})"):
        for stale in out.glob(f"{cfg.dataset}-r{cfg.rank:03d}-*.tar.*.tmp"):  # of a killed run of this rank
            stale.unlink()
        extractor = load_extractor(cfg)
        manifest = build_manifest(cfg, vocab, extractor, read_stats)
        check_same_run(out, manifest)
        manifest.write(out)
        summary = _extract_pending(cfg, shards, extractor, out, len(vocab))
        manifest.counts = shard_counts(out)
        manifest.write(out)
        _check_extracted(cfg, len(shards), out)
        if cfg.rank == 0:
            text_embeddings(extractor.encoder.vlm, list(vocab.names), cfg.text_cache, manifest.clip.id)
    summary["dropped"] = read_stats.dropped()
    summary["seconds"] = round(time.time() - start, 2)
    summary["images_per_s"] = round(summary["images"] / max(summary["seconds"], 1e-9), 2)
    return summary


class _ShardOutput:
    """The shards being written: one writer per shard in progress, committed when its last image is in."""

    def __init__(
        self, out: Path, cfg: ExtractConfig, shards: list[list[ImageRecord]], pending: list, num_classes: int
    ) -> None:
        self.out, self.cfg, self.num_classes = out, cfg, num_classes
        self.remaining = {j: len(shards[j]) for j, _ in pending}
        self.writers: dict[int, AtomicShardWriter] = {}
        self.skipped: dict[int, list] = {}
        # raw_orientation: images whose annotated size fits only the pixels as stored (EXIF ignored)
        self.summary = {
            "images": 0,
            "boxes": 0,
            "skipped": 0,
            "skipped_by_reason": {},
            "raw_orientation": 0,
            "resumed_images": sum(len(s) for s in shards) - len(pending),
        }

    def add(self, item: dict, sample: dict | None) -> None:
        """One image: its sample, or (``sample`` None) the record of why it was skipped."""
        j = item["shard"]
        if j not in self.writers:
            self.writers[j] = AtomicShardWriter(self.out / shard_name(self.cfg.dataset, self.cfg.rank, j))
        if sample is None:
            rec, reason = item["record"], item["reason"]
            log.warning("skipping unreadable image (%s): %s", reason, item["error"])
            self.skipped.setdefault(j, []).append(
                {"image_id": rec.image_id, "file_name": rec.file_name, "reason": reason, "error": item["error"]}
            )
            self.summary["skipped"] += 1
            by_reason = self.summary["skipped_by_reason"]
            by_reason[reason] = by_reason.get(reason, 0) + 1
        else:
            self.writers[j].write(sample)
            self.summary["images"] += 1
            self.summary["raw_orientation"] += int(item["raw_orientation"])
            self.summary["boxes"] += len(item["record"].boxes)
        self.remaining[j] -= 1
        if self.remaining[j] == 0:
            # num_classes: the vocabulary size the labels index, checked against the manifest by readers
            self.writers[j].commit({"skipped": self.skipped.pop(j, []), "num_classes": self.num_classes})
            del self.writers[j]  # only now: a stop during the commit still removes the temporary file

    def abort(self) -> None:
        """Remove the shards in progress (a rerun writes them again, identically)."""
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


def _loader_batches(loader: DataLoader, cfg: ExtractConfig) -> Iterator[list[dict]]:
    """The loader's batches; a stalled read (no batch within --read_timeout) or a dead reader
    process becomes an ExtractError instead of a wait without end or a bare RuntimeError."""
    batches = iter(loader)
    while True:
        try:
            items = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:
            raise ExtractError(
                f"the image readers failed: {err}. A stalled read of {cfg.images} (no image within --read_timeout "
                f"{cfg.read_timeout:g} s) or a reader killed (out of memory?); "
                "finished shards are kept: rerun to resume"
            ) from err
        yield items


def _pending(cfg: ExtractConfig, shards: list[list[ImageRecord]], out: Path) -> list[tuple[int, ImageRecord]]:
    """(shard index, image) of the shards not yet in ``out``."""
    done = {j for j in range(len(shards)) if (out / shard_name(cfg.dataset, cfg.rank, j)).exists()}
    return [(j, rec) for j, shard in enumerate(shards) if j not in done for rec in shard]


def _loader(cfg: ExtractConfig, pending: list[tuple[int, ImageRecord]], extractor: FeatureExtractor) -> DataLoader:
    return DataLoader(
        ImageFeaturesInput(pending, cfg.images, extractor.encoder.segmenter.transform),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=extractor.device.type == "cuda",
        persistent_workers=False,
        timeout=cfg.read_timeout if cfg.workers > 0 else 0,
    )


def _extract_pending(
    cfg: ExtractConfig, shards: list[list[ImageRecord]], extractor: FeatureExtractor, out: Path, num_classes: int
) -> dict:
    """Encode the images of the shards not yet in ``out`` and write those shards."""
    pending = _pending(cfg, shards, out)
    output = _ShardOutput(out, cfg, shards, pending, num_classes)
    progress = tqdm(
        total=len(pending), desc=f"extract {cfg.dataset} r{cfg.rank}", unit="img", disable=None, dynamic_ncols=True
    )

    def write(items: list[dict], good: list[dict], encoded: list[tuple]) -> None:
        samples = iter(extractor.samples(good, encoded, cfg.dataset))
        for it in items:
            output.add(it, None if "error" in it else next(samples))

    # Mask RLE and shard writing run in one background thread (in order), beside the next
    # batch's encoders: the device never waits on them, and at most one batch waits on the host.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    in_flight: Future | None = None
    try:
        for items in _loader_batches(_loader(cfg, pending, extractor), cfg):
            good = [it for it in items if "error" not in it]
            encoded = extractor.encode(good) if good else []
            if in_flight is not None:
                in_flight.result()  # raises the writer's error here, in the main thread
            in_flight = writer.submit(write, items, good, encoded)
            progress.update(len(items))
            progress.set_postfix(boxes=output.summary["boxes"])
        if in_flight is not None:
            in_flight.result()
    finally:
        writer.shutdown(wait=True)  # never abort a shard while the thread still writes it
        progress.close()
        output.abort()
    return output.summary


def _check_extracted(cfg: ExtractConfig, num_shards: int, out: Path) -> None:
    """This rank's shards must hold something usable: a run that read no image, or kept no box
    to learn from or to name, is an error with the counts by reason. Its shards stay complete
    (a rerun finds them done and fails the same way): after fixing the images, delete the folder."""
    mine = [out / shard_name(cfg.dataset, cfg.rank, j) for j in range(num_shards)]
    counts = shard_counts(out, mine)
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts["skipped_by_reason"].items())) or "none skipped"
    if counts["samples"] == 0:
        example = next((e for shard in mine for e in (read_sidecar(shard) or {}).get("skipped", [])), None)
        detail = f"; e.g. {example['error'] if isinstance(example, dict) else example}" if example else ""
        raise ExtractError(
            f"no image of {cfg.annotations} could be read under {cfg.images}: {counts['skipped']} skipped "
            f"({reasons}){detail}. Fix --images or the image files, delete {out} and run again"
        )
    sidecars = [read_sidecar(shard) or {} for shard in mine]
    if cfg.boxes is None and all("labelled_boxes" in s for s in sidecars) and counts["labelled_boxes"] == 0:
        raise ExtractError(
            f"the {counts['samples']} images read from {cfg.images} hold no box with a class "
            f"({reasons}): nothing to learn from; check the annotation file and the images"
        )
    if cfg.boxes is not None and counts["boxes"] == 0:
        raise ExtractError(
            f"the {counts['samples']} images read from {cfg.images} have no proposal box ({reasons}): "
            f"check that the image ids of {cfg.boxes} are those of {cfg.annotations}"
        )


# --------------------------------------------------------------------------------------------
# The summary line
# --------------------------------------------------------------------------------------------


def format_summary(summary: dict) -> str:
    """'extraction done: images 12, boxes 40, skipped 2 (1 missing, 1 undecodable), ...'."""
    parts = []
    for key, value in summary.items():
        if key == "skipped_by_reason" or (key == "dropped" and not value):
            continue
        if key == "skipped" and summary.get("skipped_by_reason"):
            value = f"{value} ({', '.join(f'{n} {r}' for r, n in sorted(summary['skipped_by_reason'].items()))})"
        if key == "dropped":
            key, value = "dropped at reading", ", ".join(f"{n} {r}" for r, n in value.items())
        parts.append(f"{key} {value}")
    return "extraction done: " + ", ".join(parts)
