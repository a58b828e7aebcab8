"""Offline extraction: frozen SAM + CLIP features of a dataset into WebDataset shards.

    python -m regionspot_pl.extract --images DIR --annotations FILE --out DIR \
        --sam-type vit_b --sam-checkpoint sam_vit_b_01ec64.pth --clip-model DIR

Each rank takes every ``world_size``-th image (sorted by id) and groups its images into shards
of ``--shard-size``, in order. A shard's content is therefore a pure function of the inputs:
a rerun skips the shards that exist (they were renamed into place only when complete) and
rewrites the rest identically, so a run killed at any moment loses nothing finished and never
duplicates a sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backbones.clip import ClipEncoder, clip_preprocess, load_clip, model_identity, text_embeddings
from .backbones.image import (
    ImageReadError,
    ImageSizeError,
    masks_to_original,
    read_image,
    resize_for_backbones,
    resolve_image_path,
    scale_boxes,
)
from .backbones.sam import (
    OFFICIAL_SAM_CHECKPOINTS,
    SAM_TYPES,
    SamRegionEncoder,
    SamTransform,
    build_sam,
)
from .config import load_yaml
from .data.annotations import AnnotationError, ImageRecord, ReadStats, Vocabulary, load_coco
from .data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    PROTOCOL,
    AtomicShardWriter,
    FolderLock,
    FolderLockError,
    encode_sample,
    read_sidecar,
    shard_counts,
    shard_name,
    write_json_atomic,
)
from .stopping import Stopped, stop_on_signals

log = logging.getLogger("regionspot_pl.extract")
DEFAULT_TEXT_CACHE = "cache/text_embeddings.h5"


@dataclass
class ExtractConfig:
    """Everything an extraction run depends on (stored in the manifest)."""

    images: str
    annotations: str
    out: str
    sam_checkpoint: str
    clip_model: str
    sam_type: str = "vit_b"
    clip_size: int | None = None
    boxes: str | None = None
    dataset: str | None = None
    shard_size: int = 1000
    device: str = "cpu"
    batch_size: int = 8
    workers: int = 2
    rank: int = 0
    world_size: int = 1
    masks: bool = True
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    compile: bool = False  # torch.compile the decoder and encoders (one-off compile time, then faster)
    text_cache: str = DEFAULT_TEXT_CACHE
    limit: int | None = None  # first N images only (smoke runs)
    read_timeout: float = 600.0  # seconds without a decoded batch from the image readers: an error

    # Fields that decide the content of the shards: a rerun into the same --out must agree.
    # (The precision actually used, the backbones' content and the input files' content are
    # checked too, in _check_same_run.)
    CONTENT_FIELDS = (
        "annotations",
        "boxes",
        "sam_type",
        "clip_size",
        "dataset",
        "shard_size",
        "world_size",
        "masks",
        "limit",
    )

    def check(self) -> None:
        """Numeric and choice flags, before any work: a clear error instead of a hang or a traceback."""

        def need(ok: bool, flag: str, value: object, rule: str) -> None:
            if not ok:
                raise ExtractError(f"--{flag} {value} is invalid: it must be {rule}")

        for flag in ("shard_size", "batch_size", "world_size"):
            value = getattr(self, flag)
            need(isinstance(value, int) and value >= 1, flag.replace("_", "-"), value, "an integer >= 1")
        need(isinstance(self.workers, int) and self.workers >= 0, "workers", self.workers, "an integer >= 0")
        need(
            isinstance(self.rank, int) and 0 <= self.rank < self.world_size,
            "rank",
            self.rank,
            f"in 0..{self.world_size - 1} (--world-size {self.world_size})",
        )
        need(
            self.limit is None or (isinstance(self.limit, int) and self.limit >= 1),
            "limit",
            self.limit,
            "an integer >= 1",
        )
        need(
            isinstance(self.read_timeout, (int, float)) and 0 < self.read_timeout < float("inf"),
            "read-timeout",
            self.read_timeout,
            "a number of seconds > 0",
        )
        need(self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        need(self.clip_size in (None, 224, 336), "clip-size", self.clip_size, "224 or 336")
        need(self.sam_type in SAM_TYPES, "sam-type", self.sam_type, f"one of {', '.join(SAM_TYPES)}")


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LOCK = ".extract-r{rank:03d}.lock"
PREFLIGHT_IMAGES = 16  # the first images of the plan looked up before the backbones are loaded


class ExtractError(ValueError):
    """An extraction is misconfigured, found nothing usable, or its folder is taken."""


def file_digest(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, first 16 hex digits (backbone identity in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


class ImageFeaturesInput(Dataset):
    """Decodes and resizes images for both encoders, inside DataLoader workers.

    The image path of :mod:`regionspot_pl.backbones.image`: read (EXIF applied), detectron2's
    test resize, then SAM's longest-side resize; both images stay uint8 so they cross to the
    device at a quarter of float32's bytes and are normalized there. Holds only plain data and
    SAM's weight-free transform, so it is cheap to send to workers.
    """

    def __init__(self, records: list[tuple[int, ImageRecord]], image_dir: str, sam_transform: SamTransform):
        self.records = records
        self.image_dir = Path(image_dir)
        self.sam_transform = sam_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        shard, rec = self.records[i]
        item = {"shard": shard, "record": rec}
        try:  # missing, truncated or wrong size: logged and counted by reason, not fatal
            item["reason"] = "outside_images"  # a symlink leading out (names with '..' never get here)
            path = resolve_image_path(self.image_dir, rec.file_name)
            item["reason"] = "missing"
            if not path.is_file():
                raise ImageReadError(f"image file not found: {path}")
            item["reason"] = "undecodable"
            image, item["raw_orientation"] = read_image(path, (rec.height, rec.width))
        except ImageReadError as err:
            item["error"] = str(err)
            if isinstance(err, ImageSizeError):
                item["reason"] = "size_mismatch"
            return item
        del item["reason"]
        resized = resize_for_backbones(image)
        item["resized_size"] = resized.shape[:2]
        item["sam_image"] = self.sam_transform.resize(resized)
        item["clip_image"] = torch.from_numpy(resized).permute(2, 0, 1)
        return item


def _collate(items: list[dict]) -> list[dict]:
    return items


def resolved_precision(device: torch.device, precision: str) -> str:
    """The precision ``auto`` stands for on this device: bf16 where the card has it, fp16 on
    others (V100), fp32 on CPU. Recorded in the manifest: shards of one folder share it."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(device: torch.device, precision: str):
    """fp16 on cards without bf16 (V100), bf16 where supported; fp32 on CPU unless asked."""
    precision = resolved_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def masks_to_rle(masks: torch.Tensor) -> list[dict]:
    """[N, H, W] bool -> N COCO RLEs with str counts (JSON-safe)."""
    if len(masks) == 0:
        return []
    fortran = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(fortran)
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def plan_shards(records: list[ImageRecord], rank: int, world_size: int, shard_size: int) -> list[list[ImageRecord]]:
    """This rank's images (every world_size-th by id), grouped into shards in order."""
    mine = sorted(records, key=lambda r: r.image_id)[rank::world_size]
    return [mine[i : i + shard_size] for i in range(0, len(mine), shard_size)]


class FeatureExtractor:
    """Frozen SAM + CLIP on a device; turns a batch of prepared images into shard samples."""

    def __init__(self, cfg: ExtractConfig) -> None:
        self.device = torch.device(cfg.device)
        self.precision = cfg.precision
        self.with_masks = cfg.masks
        self.sam = SamRegionEncoder(build_sam(cfg.sam_type, cfg.sam_checkpoint)).to(self.device)
        clip_model, tokenizer = load_clip(cfg.clip_model)
        self.clip = ClipEncoder(clip_model, tokenizer).to(self.device)
        if cfg.clip_size is not None and cfg.clip_size != self.clip.image_size:
            raise ValueError(
                f"--clip-size {cfg.clip_size} does not match the CLIP model in {cfg.clip_model}, "
                f"which takes {self.clip.image_size}x{self.clip.image_size} input; pass --clip-size "
                f"{self.clip.image_size} or a CLIP model of that size"
            )
        if cfg.compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile SAM's mask decoder (dynamic shapes: the box count varies per image) and
        both image encoders. Fuses the decoder's per-box elementwise work: 1.5x end to end on a
        CPU in fp32, 1.6-1.8x on top of bf16 (docs/benchmarks.md); outputs equal eager up to float
        rounding. The modules are replaced in place, so SAM's own code (and the region-token
        hook on the decoder's transformer) runs unchanged inside the compiled graph."""
        sam = self.sam.sam
        sam.mask_decoder = torch.compile(sam.mask_decoder, dynamic=True)
        sam.image_encoder = torch.compile(sam.image_encoder)
        self.clip.model.vision_model = torch.compile(self.clip.model.vision_model)

    @torch.inference_mode()
    def encode(self, items: list[dict]) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor | None]]:
        """Prepared items -> per image (SAM tokens [N, 256] float32, CLIP tokens [T, D] float16,
        masks [N, H, W] bool at the original size, or None when masks are not stored), in order."""
        sam_in = self.sam.prepare([it["sam_image"] for it in items])
        clip_in = torch.stack(
            [clip_preprocess(it["clip_image"].to(self.device, non_blocking=True), self.clip.image_size) for it in items]
        )
        out = []
        with autocast_for(self.device, self.precision):
            # On a CPU a batch only adds memory traffic to SAM's ViT (batch 8 ran at 0.53x the
            # per-image speed, docs/benchmarks.md); on a GPU the batch is what fills the device.
            per_call = 1 if self.device.type == "cpu" else len(sam_in)
            embeddings = torch.cat([self.sam.encode_images(chunk) for chunk in sam_in.split(per_call)])
            clip_tokens = self.clip.feature_map(clip_in).half().cpu().numpy()
            sizes = [tuple(it["resized_size"]) for it in items]
            boxes = [
                scale_boxes(
                    torch.from_numpy(it["record"].boxes).to(self.device),
                    (it["record"].height, it["record"].width),
                    size,
                )
                for it, size in zip(items, sizes)
            ]
            # all boxes of the batch through SAM's decoder together: one call per image would
            # leave a GPU waiting on launches (equal results, tests/test_backbones.py)
            decoded = self.sam.encode_boxes_batch(embeddings, boxes, sizes)
            for it, clip_row, (tokens, masks) in zip(items, clip_tokens, decoded):
                rec: ImageRecord = it["record"]
                # masks are upsampled only where they are stored (evaluation splits)
                full = masks_to_original(masks, (rec.height, rec.width)) if self.with_masks else None
                out.append((tokens.float().cpu().numpy(), clip_row, full))
        return out

    def __call__(self, items: list[dict], dataset: str) -> list[dict]:
        """Prepared items (no errors) -> encoded webdataset samples, in the same order."""
        return self.samples(items, self.encode(items), dataset)

    def samples(self, items: list[dict], encoded: list[tuple], dataset: str) -> list[dict]:
        """``encode``'s output -> webdataset samples (mask RLE, serialising): host work only, so
        it can run beside the next batch's device work."""
        samples = []
        for it, (tokens, clip_tokens, masks) in zip(items, encoded):
            rec: ImageRecord = it["record"]
            meta = {"file_name": rec.file_name, "width": rec.width, "height": rec.height, "dataset": dataset}
            if self.with_masks:
                meta["masks"] = masks_to_rle(masks)
            samples.append(encode_sample(rec.image_id, tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, meta))
        return samples


def _manifest(cfg: ExtractConfig, vocab: Vocabulary, extractor: FeatureExtractor, read_stats: ReadStats) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "protocol": PROTOCOL,
        "precision": resolved_precision(extractor.device, cfg.precision),
        "dataset": cfg.dataset,
        "vocabulary": vocab.to_dict(),
        "backbones": {
            "sam": {
                "type": cfg.sam_type,
                "checkpoint": str(Path(cfg.sam_checkpoint).resolve()),
                "sha256_16": file_digest(cfg.sam_checkpoint),
                "image_size": extractor.sam.img_size,
            },
            "clip": {
                "model": str(Path(cfg.clip_model).resolve()),
                "id": model_identity(cfg.clip_model),
                "image_size": extractor.clip.image_size,
                "tokens": extractor.clip.num_tokens,
                "vision_dim": extractor.clip.vision_dim,
                "text_dim": extractor.clip.text_dim,
            },
        },
        "text_cache": str(Path(cfg.text_cache).resolve()),
        "annotations": {
            "sha256_16": file_digest(cfg.annotations),
            "boxes_sha256_16": file_digest(cfg.boxes) if cfg.boxes else None,
            **read_stats.to_dict(),
        },
        "config": {k: v for k, v in asdict(cfg).items()},
    }


def _check_same_run(out: Path, manifest: dict) -> None:
    """Refuse to resume into a folder that holds a different extraction."""
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExtractError(f"{path} is not valid JSON ({err}): delete {out} to start over") from err
    diffs = [k for k in ExtractConfig.CONTENT_FIELDS if old.get("config", {}).get(k) != manifest["config"].get(k)]
    if old.get("protocol") != manifest["protocol"]:
        diffs.append(f"feature protocol ({old.get('protocol') or 'unrecorded'} -> {manifest['protocol']})")
    old_precision = old.get("precision") or old.get("config", {}).get("precision")
    if old_precision not in (None, "auto") and old_precision != manifest["precision"]:
        diffs.append(
            f"precision ({old_precision} -> {manifest['precision']}; pass --precision {old_precision} to continue it)"
        )
    for b in ("sam", "clip"):
        key = "sha256_16" if b == "sam" else "id"
        if old.get("backbones", {}).get(b, {}).get(key) != manifest["backbones"][b][key]:
            diffs.append(f"{b} weights")
    for key, what in (("sha256_16", "annotation file content"), ("boxes_sha256_16", "proposals file content")):
        if old.get("annotations", {}).get(key) != manifest["annotations"][key]:
            diffs.append(what)
    if diffs:
        raise ExtractError(
            f"{out} already holds shards of a different extraction (differs in: {', '.join(diffs)}). "
            "Use another --out, or delete the folder to start over."
        )


def _plan(cfg: ExtractConfig) -> tuple[list[list[ImageRecord]], Vocabulary, ReadStats]:
    """Check the inputs and plan this rank's shards; returns (shards, vocabulary, read stats).

    Everything here runs before the backbones load: a bad flag, annotation file or image folder
    fails in seconds, naming the file, the record and the fix.
    """
    cfg.check()
    cfg.dataset = cfg.dataset or Path(cfg.annotations).stem
    if not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {cfg.images} (pass --images DIR)")
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
            "use a --world-size of at most the number of images"
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


def run_extraction(cfg: ExtractConfig) -> dict:
    """Extract features for this rank's images; returns the run summary.

    The rank's part of ``--out`` is locked for the run (``.extract-rNNN.lock``, holding the pid
    and host): a second extraction of the same rank into the same folder is refused.
    """
    start = time.time()
    shards, vocab, read_stats = _plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out / LOCK.format(rank=cfg.rank), f"extraction folder {out} (rank {cfg.rank})"):
        for stale in out.glob(f"{cfg.dataset}-r{cfg.rank:03d}-*.tar.tmp"):  # of a killed run of this rank
            stale.unlink()
        extractor = FeatureExtractor(cfg)
        manifest = _manifest(cfg, vocab, extractor, read_stats)
        _check_same_run(out, manifest)
        write_json_atomic(out / MANIFEST, manifest)
        summary = _extract_pending(cfg, shards, extractor, out, len(vocab))
        manifest["counts"] = shard_counts(out)
        write_json_atomic(out / MANIFEST, manifest)
        _check_extracted(cfg, len(shards), out)
        if cfg.rank == 0:
            text_embeddings(extractor.clip, list(vocab.names), cfg.text_cache, manifest["backbones"]["clip"]["id"])
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
    """The loader's batches; a stalled read (no batch within --read-timeout) or a dead reader
    process becomes an ExtractError instead of a wait without end or a bare RuntimeError."""
    batches = iter(loader)
    while True:
        try:
            items = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:
            raise ExtractError(
                f"the image readers failed: {err}. A stalled read of {cfg.images} (no image within --read-timeout "
                f"{cfg.read_timeout:g} s) or a reader killed (out of memory?); "
                "finished shards are kept: rerun to resume"
            ) from err
        yield items


def _extract_pending(
    cfg: ExtractConfig, shards: list[list[ImageRecord]], extractor: FeatureExtractor, out: Path, num_classes: int
) -> dict:
    """Encode the images of the shards not yet in ``out`` and write those shards."""
    pending = [
        (j, rec)
        for j, shard in enumerate(shards)
        if not (out / shard_name(cfg.dataset, cfg.rank, j)).exists()
        for rec in shard
    ]
    loader = DataLoader(
        ImageFeaturesInput(pending, cfg.images, extractor.sam.transform),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=_collate,
        pin_memory=extractor.device.type == "cuda",
        persistent_workers=False,
        timeout=cfg.read_timeout if cfg.workers > 0 else 0,
    )
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
        for items in _loader_batches(loader, cfg):
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regionspot_pl.extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", help="YAML file whose keys are these flags (e.g. configs/data/o365.yaml); flags override it"
    )
    p.add_argument("--images", help="folder the annotation file_names are relative to")
    p.add_argument("--annotations", help="COCO-format JSON (categories, images, annotations)")
    p.add_argument("--out", help="output folder for the shards and manifest.json")
    p.add_argument("--sam-type", choices=SAM_TYPES)
    p.add_argument("--sam-checkpoint", help="SAM .pth, e.g. " + OFFICIAL_SAM_CHECKPOINTS["vit_b"])
    p.add_argument("--clip-model", help="local Hugging Face CLIP folder (save_pretrained layout)")
    p.add_argument("--clip-size", type=int, choices=(224, 336), help="CLIP input size; must match the model")
    p.add_argument("--boxes", help="proposals in COCO results format (image_id, bbox xywh, score) instead of GT boxes")
    p.add_argument("--dataset", help="dataset name stored with each sample (default: annotation file stem)")
    p.add_argument("--shard-size", type=int, help="images per shard (default 1000)")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, help="images per encoder batch (default 8)")
    p.add_argument("--workers", type=int, help="image decoding workers (default 2)")
    p.add_argument("--rank", type=int, help="this process's rank (default: $RANK from torchrun, else 0)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE, else 1)")
    p.add_argument("--no-masks", dest="masks", action="store_false", default=None, help="do not store SAM masks")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile SAM's decoder and the encoders: ~10-30 s to compile, then 1.5x (CPU, fp32)",
    )
    p.add_argument("--text-cache", help=f"HDF5 text-embedding cache (default {DEFAULT_TEXT_CACHE})")
    p.add_argument("--limit", type=int, help="only the first N images by id (smoke runs)")
    p.add_argument(
        "--read-timeout",
        type=float,
        help="seconds without a decoded batch from the image readers before the run fails (default 600)",
    )
    return p


def config_from_args(argv: list[str] | None = None) -> ExtractConfig:
    args = _parser().parse_args(argv)
    values: dict = load_yaml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    values.setdefault("rank", int(os.environ.get("RANK", 0)))
    values.setdefault("world_size", int(os.environ.get("WORLD_SIZE", 1)))
    if values.get("device") == "cuda" and "LOCAL_RANK" in os.environ:
        values["device"] = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one GPU per process
    known = {f.name for f in fields(ExtractConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: unknown config keys {unknown} in {args.config}")
    missing = [k for k in ("images", "annotations", "out", "sam_checkpoint", "clip_model") if not values.get(k)]
    if missing:
        raise SystemExit("error: missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.config:  # a shipped config holds placeholder paths: say which to edit
        for key in ("images", "annotations", "sam_checkpoint", "clip_model"):
            if not Path(values[key]).exists():
                raise SystemExit(
                    f"error: {key.replace('_', '-')} path {values[key]} (from {args.config}) does not exist; "
                    f"edit it in {args.config} or pass --{key.replace('_', '-')}"
                )
    if not 0 <= values["rank"] < values["world_size"]:
        raise SystemExit(f"error: rank {values['rank']} is outside world size {values['world_size']}")
    return ExtractConfig(**values)


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


def main(argv: list[str] | None = None) -> int:
    """The CLI: bad input is one ``error:`` line and exit 2; SIGTERM/SIGINT stop it with the
    finished shards kept (exit 128 + the signal number)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(argv)
    except SystemExit as err:
        if isinstance(err.code, str):  # "error: ..." from the flag checks
            print(err.code, file=sys.stderr)
            return 2
        raise
    try:
        with stop_on_signals():
            summary = run_extraction(cfg)
    except Stopped as stop:
        print(f"{stop}: the finished shards are kept; run the same command again to continue", file=sys.stderr)
        return stop.exit_code
    except (FileNotFoundError, AnnotationError, FolderLockError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
