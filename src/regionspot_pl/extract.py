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
from .data.annotations import AnnotationError, ImageRecord, load_coco
from .data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    PROTOCOL,
    AtomicShardWriter,
    encode_sample,
    shard_counts,
    shard_name,
    write_json_atomic,
)

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

    # Fields that decide the content of the shards: a rerun into the same --out must agree.
    CONTENT_FIELDS = ("annotations", "boxes", "sam_type", "clip_size", "dataset", "shard_size", "world_size", "masks", "limit")


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
        try:
            path = resolve_image_path(self.image_dir, rec.file_name)
            image, item["raw_orientation"] = read_image(path, (rec.height, rec.width))
        except ImageReadError as err:  # missing, truncated or wrong size: logged and counted, not fatal
            item["error"] = str(err)
            return item
        resized = resize_for_backbones(image)
        item["resized_size"] = resized.shape[:2]
        item["sam_image"] = self.sam_transform.resize(resized)
        item["clip_image"] = torch.from_numpy(resized).permute(2, 0, 1)
        return item


def _collate(items: list[dict]) -> list[dict]:
    return items


def autocast_for(device: torch.device, precision: str):
    """fp16 on cards without bf16 (V100), bf16 where supported; fp32 on CPU unless asked."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device.type, dtype=dtype)


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
    def encode(self, items: list[dict]) -> list[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Prepared items -> per image (SAM tokens [N, 256] float32, CLIP tokens [T, D] float16,
        masks [N, H, W] bool at the original size), in the same order."""
        sam_in = self.sam.prepare([it["sam_image"] for it in items])
        clip_in = torch.stack([
            clip_preprocess(it["clip_image"].to(self.device, non_blocking=True), self.clip.image_size)
            for it in items
        ])
        out = []
        with autocast_for(self.device, self.precision):
            # On a CPU a batch only adds memory traffic to SAM's ViT (batch 8 ran at 0.53x the
            # per-image speed, docs/benchmarks.md); on a GPU the batch is what fills the device.
            per_call = 1 if self.device.type == "cpu" else len(sam_in)
            embeddings = torch.cat([self.sam.encode_images(chunk) for chunk in sam_in.split(per_call)])
            clip_tokens = self.clip.feature_map(clip_in).half().cpu().numpy()
            for i, it in enumerate(items):
                rec: ImageRecord = it["record"]
                original, resized = (rec.height, rec.width), tuple(it["resized_size"])
                boxes = scale_boxes(torch.from_numpy(rec.boxes).to(self.device), original, resized)
                tokens, masks = self.sam.encode_boxes(embeddings[i], boxes, resized)
                out.append((tokens.float().cpu().numpy(), clip_tokens[i], masks_to_original(masks, original)))
        return out

    def __call__(self, items: list[dict], dataset: str) -> list[dict]:
        """Prepared items (no errors) -> encoded webdataset samples, in the same order."""
        samples = []
        for it, (tokens, clip_tokens, masks) in zip(items, self.encode(items)):
            rec: ImageRecord = it["record"]
            meta = {"file_name": rec.file_name, "width": rec.width, "height": rec.height, "dataset": dataset}
            if self.with_masks:
                meta["masks"] = masks_to_rle(masks)
            samples.append(encode_sample(rec.image_id, tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, meta))
        return samples


def _manifest(cfg: ExtractConfig, vocab, extractor: FeatureExtractor, read_stats) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "protocol": PROTOCOL,
        "dataset": cfg.dataset,
        "vocabulary": vocab.to_dict(),
        "backbones": {
            "sam": {"type": cfg.sam_type, "checkpoint": str(Path(cfg.sam_checkpoint).resolve()),
                    "sha256_16": file_digest(cfg.sam_checkpoint), "image_size": extractor.sam.img_size},
            "clip": {"model": str(Path(cfg.clip_model).resolve()), "id": model_identity(cfg.clip_model),
                     "image_size": extractor.clip.image_size, "tokens": extractor.clip.num_tokens,
                     "vision_dim": extractor.clip.vision_dim, "text_dim": extractor.clip.text_dim},
        },
        "text_cache": str(Path(cfg.text_cache).resolve()),
        "annotations": {"sha256_16": file_digest(cfg.annotations),
                        "boxes_sha256_16": file_digest(cfg.boxes) if cfg.boxes else None, **read_stats.to_dict()},
        "config": {k: v for k, v in asdict(cfg).items()},
    }


def _check_same_run(out: Path, manifest: dict) -> None:
    """Refuse to resume into a folder that holds a different extraction."""
    path = out / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diffs = [k for k in ExtractConfig.CONTENT_FIELDS if old.get("config", {}).get(k) != manifest["config"].get(k)]
    if old.get("protocol") != manifest["protocol"]:
        diffs.append(f"feature protocol ({old.get('protocol') or 'unrecorded'} -> {manifest['protocol']})")
    for b in ("sam", "clip"):
        key = "sha256_16" if b == "sam" else "id"
        if old.get("backbones", {}).get(b, {}).get(key) != manifest["backbones"][b][key]:
            diffs.append(f"{b} weights")
    for key, what in (("sha256_16", "annotation file content"), ("boxes_sha256_16", "proposals file content")):
        if old.get("annotations", {}).get(key) != manifest["annotations"][key]:
            diffs.append(what)
    if diffs:
        raise SystemExit(
            f"error: {out} already holds shards of a different extraction (differs in: {', '.join(diffs)}). "
            "Use another --out, or delete the folder to start over."
        )


def run_extraction(cfg: ExtractConfig) -> dict:
    """Extract features for this rank's images; returns the run summary."""
    start = time.time()
    dataset = cfg.dataset or Path(cfg.annotations).stem
    cfg.dataset = dataset
    if not Path(cfg.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {cfg.images} (pass --images DIR)")
    records, vocab, read_stats = load_coco(cfg.annotations, cfg.boxes)
    if cfg.limit is not None:
        records = sorted(records, key=lambda r: r.image_id)[: cfg.limit]
    shards = plan_shards(records, cfg.rank, cfg.world_size, cfg.shard_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    extractor = FeatureExtractor(cfg)
    manifest = _manifest(cfg, vocab, extractor, read_stats)
    _check_same_run(out, manifest)
    write_json_atomic(out / MANIFEST, manifest)

    pending = [(j, rec) for j, shard in enumerate(shards)
               if not (out / shard_name(dataset, cfg.rank, j)).exists() for rec in shard]
    done_before = sum(len(s) for s in shards) - len(pending)
    loader = DataLoader(
        ImageFeaturesInput(pending, cfg.images, extractor.sam.transform),
        batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate,
        pin_memory=extractor.device.type == "cuda", persistent_workers=False,
    )
    # raw_orientation: images whose annotated size fits only the pixels as stored (EXIF ignored)
    summary = {"images": 0, "boxes": 0, "skipped": 0, "raw_orientation": 0, "resumed_images": done_before}
    remaining = {j: len(shards[j]) for j, _ in pending}
    writers: dict[int, AtomicShardWriter] = {}
    skipped: dict[int, list] = {}
    progress = tqdm(total=len(pending), desc=f"extract {dataset} r{cfg.rank}", unit="img",
                    disable=None, dynamic_ncols=True)
    try:
        for items in loader:
            good = [it for it in items if "error" not in it]
            for it in items:
                if "error" in it:
                    log.warning("skipping unreadable image: %s", it["error"])
                    skipped.setdefault(it["shard"], []).append(it["error"])
                    summary["skipped"] += 1
            samples = iter(extractor(good, dataset)) if good else iter(())
            for it in items:
                j = it["shard"]
                if j not in writers:
                    writers[j] = AtomicShardWriter(out / shard_name(dataset, cfg.rank, j))
                if "error" not in it:
                    writers[j].write(next(samples))
                    summary["images"] += 1
                    summary["raw_orientation"] += int(it["raw_orientation"])
                    summary["boxes"] += len(it["record"].boxes)
                remaining[j] -= 1
                if remaining[j] == 0:
                    writers.pop(j).commit({"skipped": skipped.pop(j, [])})
            progress.update(len(items))
            progress.set_postfix(boxes=summary["boxes"])
    finally:
        progress.close()
        for w in writers.values():
            w.abort()
    manifest["counts"] = shard_counts(out)
    write_json_atomic(out / MANIFEST, manifest)
    if cfg.rank == 0 and len(vocab):
        text_embeddings(extractor.clip, list(vocab.names), cfg.text_cache, manifest["backbones"]["clip"]["id"])
    summary["seconds"] = round(time.time() - start, 2)
    summary["images_per_s"] = round(summary["images"] / max(summary["seconds"], 1e-9), 2)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regionspot_pl.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys are these flags (e.g. configs/data/o365.yaml); flags override it")
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
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile SAM's decoder and the encoders: ~10-30 s to compile, then 1.5x (CPU, fp32)")
    p.add_argument("--text-cache", help=f"HDF5 text-embedding cache (default {DEFAULT_TEXT_CACHE})")
    p.add_argument("--limit", type=int, help="only the first N images by id (smoke runs)")
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
                raise SystemExit(f"error: {key.replace('_', '-')} path {values[key]} (from {args.config}) does not exist; "
                                 f"edit it in {args.config} or pass --{key.replace('_', '-')}")
    if not 0 <= values["rank"] < values["world_size"]:
        raise SystemExit(f"error: rank {values['rank']} is outside world size {values['world_size']}")
    return ExtractConfig(**values)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(argv)
    try:
        summary = run_extraction(cfg)
    except (FileNotFoundError, AnnotationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("extraction done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
