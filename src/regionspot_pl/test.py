"""Zero-shot test of a head (or a CLIP crop baseline) on a cached split: box and mask AP.

    python -m regionspot_pl.test --split lvis_val                       # configs/test/lvis_val.yaml
    python -m regionspot_pl.test --split lvis_val --method clip-mask --out runs/test/lvis_val_clip_mask

Flags override the split's YAML (its keys are the flags, with '_' for '-'). Boxes come from the
shards: GT boxes, or proposals when the shards were extracted with ``--boxes``; the model only
names them. Each (box, class) pair is scored by the softmax over the vocabulary (times the
proposal score for proposals) and each image keeps its best pairs, at most 300 (LVIS protocol).

Writes OUT/detections_bbox.json, OUT/detections_segm.json (the same detections with the SAM mask
of each box; not when the shards were extracted with --no-masks) and OUT/metrics.json
(``{"bbox": {"AP": ...}, "segm": {...}}``, fractions, null where nothing was there to score).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from .backbones.clip import ClipEncoder, LazyTextEncoder, load_clip, model_identity, text_embeddings
from .backbones.image import ImageReadError, read_image, resolve_image_path
from .config import find_config, load_yaml, merge
from .data.annotations import AnnotationError, Vocabulary, read_json
from .data.datamodule import CacheInfo, collate_regions
from .data.shards import ShardFormatError, iter_samples
from .evaluation.baselines import BASELINES, box_crops, crop_logits
from .evaluation.metrics import (
    BACKENDS,
    DEFAULT_BACKEND,
    LVIS_METRICS,
    EvaluationInputError,
    evaluate_results,
    format_metrics_table,
)
from .evaluation.report import write_report
from .evaluation.scoring import MAX_DETS_PER_IMAGE, detections_to_results, score_regions
from .model.checkpoint import CheckpointError, load_head
from .model.head import RegionSpotHead, region_logits
from .stopping import Stopped, stop_on_signals

METHODS: tuple[str, ...] = ("regionspot", *BASELINES)
# Config keys = the flags. Defaults that depend on the method (batch size) are set in run_test.
KEYS: tuple[str, ...] = (
    "shards",
    "annotations",
    "head",
    "clip_model",
    "vocab",
    "method",
    "topk",
    "out",
    "device",
    "images",
    "batch_size",
    "text_cache",
    "workers",
    "metric_backend",
)
DEFAULTS: dict[str, Any] = {
    "method": "regionspot",
    "topk": MAX_DETS_PER_IMAGE,
    "workers": 2,
    "metric_backend": DEFAULT_BACKEND,
}
# regionspot: images per head batch; baselines: box crops per CLIP image-tower batch.
DEFAULT_BATCH = {"regionspot": 16, "clip-box": 128, "clip-mask": 128}


class TestError(ValueError):
    """A test run is misconfigured: missing inputs, or parts that do not fit together."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass
class ImageLogits:
    """One image's boxes and their region-class logits."""

    image_id: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    scores: np.ndarray  # float32 [N] box scores (1 for GT boxes)
    logits: Tensor  # [N, C] on CPU
    masks: list[dict] | None  # N COCO RLEs of the SAM masks, or None (--no-masks shards)


@dataclass
class ImageDetections:
    """One image's kept (box, class) pairs, as :func:`score_regions` returns them."""

    image_id: int
    boxes: np.ndarray  # [N, 4] xyxy
    box_idx: Tensor  # [K]
    class_idx: Tensor  # [K]
    scores: Tensor  # [K]
    masks: list[dict] | None


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def vocabulary(gt: dict, annotations: str, vocab_file: str | None = None) -> Vocabulary:
    """The test vocabulary: the annotation file's categories in id order (as the shards use).

    ``vocab_file`` (one class name per line) renames them, e.g. to try other prompts; it must
    list exactly one name per category, in category-id order.
    """
    cats = sorted(gt.get("categories", []), key=lambda c: int(c["id"]))
    if not cats:
        raise TestError(f"{annotations} has no 'categories': pass the COCO/LVIS annotation file of the split")
    names = [str(c["name"]) for c in cats]
    if vocab_file:
        path = Path(vocab_file)
        if not path.is_file():
            raise TestError(f"vocabulary file not found: {path} (--vocab takes a text file, one class name a line)")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != len(cats):
            raise TestError(
                f"--vocab {path} lists {len(names)} class names but {annotations} has {len(cats)} categories: "
                "the file must give one name per category, in the order of the category ids "
                f"({cats[0]['id']}: {cats[0]['name']!r}, ...)"
            )
    freqs = tuple(c["frequency"] for c in cats) if all("frequency" in c for c in cats) else ()
    return Vocabulary(tuple(names), tuple(int(c["id"]) for c in cats), freqs)


def _load_clip(model_dir: str) -> ClipEncoder:
    try:
        return ClipEncoder(*load_clip(model_dir))
    except ValueError as err:  # not a CLIP folder: a configuration problem, not a bug
        raise TestError(str(err)) from err


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise TestError(f"--device {device} asked for, but no CUDA device is available: pass --device cpu")
    return torch.device(device)


def _check_head(head: RegionSpotHead, path: str, clip_info: dict, folder: str) -> None:
    if head.config.clip_dim != clip_info["vision_dim"]:
        raise TestError(
            f"head {path} takes CLIP features of width {head.config.clip_dim}, but the shards in {folder} hold "
            f"{clip_info['vision_dim']}-wide CLIP tokens (from {clip_info['model']}): use the head variant "
            "of that CLIP (BB for ViT-B/16 features, BL for ViT-L/14) or re-extract the shards"
        )


def _config_text_dim(clip_dir: str) -> int | None:
    """A CLIP snapshot's joint embedding dim from its config.json, None when unreadable."""
    try:
        return int(json.loads((Path(clip_dir) / "config.json").read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_clip / model_identity will say what is wrong with the folder


def _check_text_dim(head: RegionSpotHead, path: str, text_dim: int | None, clip_dir: str) -> None:
    if text_dim is not None and text_dim != head.config.text_dim:
        raise TestError(
            f"the vocabulary's text embeddings are {text_dim}-d (CLIP {clip_dir}) but the head {path} projects "
            f"regions to text dim {head.config.text_dim}: a head only works with the CLIP it was trained with "
            "(BB: ViT-B/16, 512-d; BL: ViT-L/14, 768-d); pass that one as --clip-model"
        )


# --------------------------------------------------------------------------------------------
# Logits per image: the head over cached features, or CLIP over crops
# --------------------------------------------------------------------------------------------


def _batches(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def regionspot_logits(
    head: RegionSpotHead, shards: list[str], texts: Tensor, device: torch.device, batch_size: int
) -> Iterator[ImageLogits]:
    """The head over the cached split, ``batch_size`` images at a time (boxes padded).

    Padded queries are masked out of the self-attention, so an image's logits do not depend
    on the batch it lands in.
    """
    texts = texts.to(device)
    for chunk in _batches(iter_samples(shards), batch_size):
        for s in chunk:
            s["dataset_index"] = 0  # collate_regions checks one vocabulary per batch
        batch = collate_regions(chunk).to(device)
        with torch.inference_mode():
            regions = head(batch.sam, batch.clip, padding_mask=batch.padding_mask)  # [B, N, text_dim]
            logits = region_logits(regions, texts).cpu()  # [B, N, C]
        for i, s in enumerate(chunk):
            n = len(s["labels"])  # collate keeps every box in order: the first n rows are real
            yield ImageLogits(
                int(s["meta"]["image_id"]), s["boxes"], s["scores"], logits[i, :n], s["meta"].get("masks")
            )


def _identity(item: Any) -> Any:
    return item


class _CropStream(IterableDataset):
    """Decodes each image of the shards and crops its boxes, in DataLoader workers.

    Shards are dealt to workers (shard i to worker i mod workers), so each image is read once.
    A bad image yields ``{"error": message}``, raised as a clean error by the main process.
    """

    def __init__(self, shards: list[str], images: str, size: int, with_masks: bool) -> None:
        self.shards, self.images, self.size, self.with_masks = shards, Path(images), size, with_masks

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        if not mine:
            return
        for s in iter_samples(mine):
            meta = s["meta"]
            try:
                path = resolve_image_path(self.images, meta["file_name"])
                image, _raw = read_image(path, (meta["height"], meta["width"]))
            except ImageReadError as err:  # missing, unreadable or resized: probably the wrong folder
                yield {
                    "error": f"{err}; the crop baselines need the original images: pass --images DIR, "
                    "the folder the shards were extracted from"
                }
                return
            masks = meta.get("masks")
            crops = box_crops(image, s["boxes"], self.size, masks if self.with_masks else None)
            yield {
                "image_id": int(meta["image_id"]),
                "boxes": s["boxes"],
                "scores": s["scores"],
                "masks": masks,
                "crops": crops,
            }


def baseline_logits(
    encoder: ClipEncoder,
    shards: list[str],
    texts: Tensor,
    images: str,
    with_masks: bool,
    batch_size: int,
    workers: int,
) -> Iterator[ImageLogits]:
    """CLIP on each box's crop (masked outside the SAM mask when ``with_masks``), batched over
    the boxes of consecutive images: ``batch_size`` crops per CLIP forward."""
    loader = DataLoader(
        _CropStream(shards, images, encoder.image_size, with_masks),
        batch_size=None,
        num_workers=min(workers, len(shards)),
        collate_fn=_identity,
    )
    pending: list[dict] = []

    def flush() -> Iterator[ImageLogits]:
        logits = crop_logits(encoder, torch.cat([p["crops"] for p in pending]), texts, batch_size)
        for p, part in zip(pending, logits.split([len(p["boxes"]) for p in pending])):
            yield ImageLogits(p["image_id"], p["boxes"], p["scores"], part, p["masks"])
        pending.clear()

    for item in loader:
        if "error" in item:
            raise TestError(item["error"])
        pending.append(item)
        if sum(len(p["boxes"]) for p in pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def results_of(dets: list[ImageDetections], category_ids: tuple[int, ...], with_masks: bool) -> list[dict]:
    """Detections in COCO/LVIS results format, with each box's SAM mask when ``with_masks``."""
    out = []
    for d in dets:
        out += detections_to_results(
            d.image_id,
            torch.from_numpy(d.boxes),
            d.box_idx,
            d.class_idx,
            d.scores,
            category_ids,
            d.masks if with_masks else None,
        )
    return out


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)  # never leave a half-written results file under the final name


def _json_metrics(metrics: dict[str, dict[str, float]]) -> dict:
    """Every LVIS key per IoU type; NaN (nothing to score) and keys COCO lacks become null."""

    def value(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else float(v)

    return {t: {k: value(m.get(k)) for k in LVIS_METRICS} for t, m in metrics.items()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_test(cfg: dict) -> dict:
    """Evaluate as configured; returns {"metrics", "files", "seconds"}. Raises TestError & co."""
    method = cfg.get("method", "regionspot")
    if method not in METHODS:
        raise TestError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    for key in ("shards", "annotations") + (("head",) if method == "regionspot" else ()):
        if not cfg.get(key):
            raise TestError(f"no {key} given: pass --{key.replace('_', '-')} or set '{key}' in the config")
    topk = int(MAX_DETS_PER_IMAGE if cfg.get("topk") is None else cfg["topk"])
    if topk < 1:
        raise TestError(f"--topk must be >= 1, got {topk}")
    if topk > MAX_DETS_PER_IMAGE:
        print(f"note: --topk {topk} capped at {MAX_DETS_PER_IMAGE}, the most the LVIS protocol scores per image")
    batch_size = int(DEFAULT_BATCH[method] if cfg.get("batch_size") is None else cfg["batch_size"])
    if batch_size < 1:
        raise TestError(f"--batch-size must be >= 1, got {batch_size}")
    backend = cfg.get("metric_backend") or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise TestError(
            f"unknown metric backend {backend!r}: use 'hotcoco' (fast, the default) or 'lvis' "
            "(the official LVIS API / pycocotools, the reference)"
        )
    if cfg.get("workers") is not None and int(cfg["workers"]) < 0:
        raise TestError(f"--workers must be >= 0, got {cfg['workers']}")

    folder = str(cfg["shards"])
    if not Path(folder).is_dir():
        raise TestError(
            f"shard folder not found: {folder} (extract it first with `python -m regionspot_pl.extract "
            f"--out {folder}`, or pass --shards DIR)"
        )
    info = CacheInfo.read(folder)
    clip_info, extract_cfg = info.manifest["backbones"]["clip"], info.manifest.get("config", {})
    has_masks = extract_cfg.get("masks", True) is not False
    proposals = extract_cfg.get("boxes") is not None
    gt = read_json(cfg["annotations"], "annotation file")
    if not isinstance(gt, dict) or not {"images", "categories"} <= gt.keys():
        raise TestError(f"{cfg['annotations']} is not a COCO/LVIS annotation file (no 'images'/'categories')")
    vocab = vocabulary(gt, cfg["annotations"], cfg.get("vocab"))
    device = resolve_device(cfg.get("device"))

    head = None
    if method == "regionspot":
        head = load_head(cfg["head"], map_location=device)
        _check_head(head, cfg["head"], clip_info, folder)
    if method == "clip-mask" and not has_masks:
        raise TestError(
            f"clip-mask needs the SAM masks, but the shards in {folder} were extracted with --no-masks: "
            "re-extract them with masks, or use --method clip-box"
        )

    # Text side: the CLIP the shards were extracted with, unless --clip-model names another.
    clip_dir = str(cfg.get("clip_model") or clip_info["model"])
    if method in BASELINES and not Path(clip_dir).is_dir():
        raise TestError(
            f"CLIP folder not found: {clip_dir} (the {method} baseline embeds the crops with CLIP: "
            "pass --clip-model DIR, a Hugging Face CLIP snapshot)"
        )
    same_clip = not cfg.get("clip_model") or Path(clip_dir).resolve() == Path(clip_info["model"]).resolve()
    model_id = clip_info["id"] if same_clip else model_identity(clip_dir)
    if method == "regionspot" and model_id != clip_info["id"]:
        print(
            f"note: text embeddings from {clip_dir}, a different CLIP than the one of the shards' features "
            f"({clip_info['model']})"
        )
    if head is not None:  # before any text encoding: a mismatch should not cost a vocabulary pass first
        _check_text_dim(head, cfg["head"], clip_info["text_dim"] if same_clip else _config_text_dim(clip_dir), clip_dir)
    encoder = _load_clip(clip_dir).to(device) if method in BASELINES else None
    cache = str(cfg.get("text_cache") or info.manifest["text_cache"])
    text_encoder = encoder if encoder is not None else LazyTextEncoder(clip_dir, device)
    texts = text_embeddings(text_encoder, list(vocab.names), cache, model_id)
    if head is not None:
        _check_text_dim(head, cfg["head"], texts.shape[1], clip_dir)

    if method == "regionspot":
        stream = regionspot_logits(head, info.shards, texts, device, batch_size)
    else:
        images = str(cfg.get("images") or extract_cfg.get("images") or "")
        if not images or not Path(images).is_dir():
            raise TestError(
                f"image folder {images or '(none)'} not found: the {method} baseline crops the original "
                "images; pass --images DIR (the folder the shards were extracted from)"
            )
        stream = baseline_logits(
            encoder, info.shards, texts, images, method == "clip-mask", batch_size, int(cfg.get("workers", 2))
        )

    total = info.manifest.get("counts", {}).get("samples")
    start = time.perf_counter()
    dets: list[ImageDetections] = []
    seen: set[int] = set()
    boxes = 0
    for item in tqdm(stream, total=total, desc=f"test {method}", unit="img", dynamic_ncols=True, disable=None):
        seen.add(item.image_id)
        if len(item.boxes) == 0:
            continue
        boxes += len(item.boxes)
        box_scores = torch.from_numpy(item.scores) if proposals else None  # GT boxes: probability only
        box_idx, class_idx, scores = score_regions(item.logits, box_scores, topk)
        dets.append(ImageDetections(item.image_id, item.boxes, box_idx, class_idx, scores, item.masks))
    pass_s = time.perf_counter() - start
    what = "head pass" if method == "regionspot" else f"{method} CLIP pass"
    print(
        f"{what}: {pass_s:.1f} s for {len(seen)} images, {boxes} boxes ({len(seen) / max(pass_s, 1e-9):.1f} img/s, "
        f"{device})"
    )
    gt_ids = {int(im["id"]) for im in gt["images"]}
    if len(seen & gt_ids) < len(gt_ids):
        print(
            f"note: the shards cover {len(seen & gt_ids)} of the {len(gt_ids)} images of {cfg['annotations']}; "
            "objects in the others count as missed"
        )

    out = Path(cfg.get("out") or f"runs/test/{info.name}")
    out.mkdir(parents=True, exist_ok=True)
    files, metrics, evaluations = {}, {}, {}
    iou_types = ["bbox", "segm"] if has_masks else ["bbox"]
    if not has_masks:
        print(f"note: the shards in {folder} were extracted with --no-masks: no mask AP, no detections_segm.json")
        (out / "detections_segm.json").unlink(missing_ok=True)  # not a stale file from an earlier run
    gt_has_segm = all("segmentation" in a for a in gt.get("annotations", []))
    metric_s = 0.0
    for iou_type in iou_types:
        results = results_of(dets, vocab.category_ids, with_masks=iou_type == "segm")
        files[iou_type] = out / f"detections_{iou_type}.json"
        _write_json(files[iou_type], results)
        if iou_type == "segm" and not gt_has_segm:
            print(f"note: {cfg['annotations']} has annotations without 'segmentation': no mask AP")
            continue
        start = time.perf_counter()
        # evaluate_results pauses the garbage collector itself (LVIS-sized result lists)
        evaluations[iou_type] = evaluate_results(
            gt, results, iou_type=iou_type, max_dets=MAX_DETS_PER_IMAGE, backend=backend
        )
        metrics[iou_type] = evaluations[iou_type].metrics
        metric_s += time.perf_counter() - start
        del results  # LVIS-sized result lists are GBs: one at a time
    print(f"metric step: {metric_s:.1f} s ({', '.join(metrics)})")
    files["metrics"] = out / "metrics.json"
    files["metrics"].write_text(json.dumps(_json_metrics(metrics), indent=2) + "\n")
    if evaluations:  # report.md, ap_per_class.png/.csv: what was evaluated, per-class AP
        model = {"head": cfg["head"]} if method == "regionspot" else {"method": f"{method} (CLIP {clip_dir})"}
        sources = {
            "ground truth": cfg["annotations"],
            "shards": folder,
            **model,
            "results": ", ".join(str(files[t]) for t in evaluations),
        }
        files.update(write_report(out, evaluations, gt, sources, seconds=metric_s))
    return {
        "metrics": metrics,
        "files": {k: str(v) for k, v in files.items()},
        "seconds": {"pass": pass_s, "metrics": metric_s},
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regionspot_pl.test", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--split", help="picks configs/test/SPLIT.yaml (e.g. lvis_val)")
    p.add_argument("--config", help="a test YAML (instead of the split's)")
    p.add_argument("--shards", help="shard folder of the split (python -m regionspot_pl.extract --out)")
    p.add_argument("--annotations", help="GT of the split (LVIS/COCO JSON): categories, and the AP reference")
    p.add_argument("--head", help="head checkpoint (fit's head.pt, or convert's output); regionspot only")
    p.add_argument("--clip-model", help="CLIP folder for the text side (default: the one the shards' manifest names)")
    p.add_argument("--vocab", help="class names, one a line, in category-id order (default: the annotations')")
    p.add_argument("--method", choices=METHODS, help="regionspot (default), or a CLIP crop baseline of Table 1")
    p.add_argument("--topk", type=int, help=f"detections kept per image (default and most: {MAX_DETS_PER_IMAGE})")
    p.add_argument("--out", help="output folder (default runs/test/DATASET)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--images", help="original images, for the crop baselines (default: the shards' manifest's)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per head batch (default 16), or crops per CLIP batch for the baselines (default 128)",
    )
    p.add_argument("--text-cache", help="HDF5 text-embedding cache (default: the one the shards name)")
    p.add_argument("--workers", type=int, help="image decoding workers for the crop baselines (default 2)")
    p.add_argument(
        "--metric-backend",
        choices=BACKENDS,
        help="hotcoco (default, fast) or lvis (the official LVIS API / pycocotools, the reference)",
    )
    return p


def build_config(args: argparse.Namespace) -> dict:
    """The split's YAML (or --config), then the flags on top."""
    cfg: dict = {}
    if args.config:
        cfg = load_yaml(args.config)
    elif args.split:
        cfg = load_yaml(find_config("test", args.split))
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise TestError(f"unknown keys {unknown} in the test config; known: {', '.join(KEYS)}")
    cfg = merge(merge(DEFAULTS, cfg), {k: getattr(args, k) for k in KEYS})
    if not cfg.get("out") and args.split:
        cfg["out"] = f"runs/test/{args.split}"
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = build_config(args)
        with stop_on_signals():
            result = run_test(cfg)
    except Stopped as stop:
        print(f"{stop}: the test did not finish; run it again", file=sys.stderr)
        return stop.exit_code
    except SystemExit as err:  # the config helpers exit with "error: ..."; keep this CLI's exit code
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
            return 2
        raise
    except (
        TestError,
        ShardFormatError,
        CheckpointError,
        AnnotationError,
        EvaluationInputError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_metrics_table(result["metrics"]))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
