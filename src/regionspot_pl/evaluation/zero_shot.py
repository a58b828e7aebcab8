"""Zero-shot test of a head (or a CLIP crop baseline) on a cached split: the library behind
``python -m regionspot_pl.test`` (:mod:`regionspot_pl.test` is its command line).

Boxes come from the shards: GT boxes, or proposals when the shards were extracted with
``--boxes``; the model only names them. Each (box, class) pair is scored by the softmax over the
vocabulary (times the proposal score for proposals) and each image keeps its best pairs, at most
300 (LVIS protocol).

:func:`run_test` reads top-down as its steps: :func:`resolve_inputs` (files read and checked
before any model runs), :func:`build_models` (head or CLIP, text embeddings), the logits stream
(:func:`regionspot_logits` or :func:`baseline_logits`), :func:`score_images` and
:func:`write_outputs` (detections, metrics.json, report).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ..backbones.clip import ClipEncoder, LazyTextEncoder, load_clip, model_identity, text_embeddings
from ..backbones.common import resolve_device
from ..backbones.image import ImageReadError, read_image, resolve_image_path
from ..cache.manifest import ShardFolder
from ..cache.shards import iter_samples
from ..cli import ConfigError, option
from ..data.annotations import Vocabulary
from ..errors import RegionSpotError
from ..model.checkpoint import CheckpointError, load_head
from ..model.head import RegionSpotHead, check_head_fits, region_logits
from ..train.datamodule import collate_regions
from ..utils.io import batched, read_json, write_json_atomic
from .baselines import BASELINES, box_crops, crop_logits
from .metrics import BACKENDS, DEFAULT_BACKEND, LVIS_METRICS, Evaluation, EvaluationInputError, evaluate_results
from .report import write_report
from .scoring import MAX_DETS_PER_IMAGE, detections_to_results, score_regions

METHODS: tuple[str, ...] = ("regionspot", *BASELINES)
# What --batch-size counts when it is not given: images per head batch (regionspot), box crops
# per CLIP image-tower batch (the baselines).
DEFAULT_BATCH = {"regionspot": 16, "clip-box": 128, "clip-mask": 128}


class TestError(RegionSpotError, ValueError):
    """A test run is misconfigured: missing inputs, or parts that do not fit together."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass
class TestConfig:
    """Settings of ``python -m regionspot_pl.test`` (flags, and the keys of configs/test/*.yaml)."""

    __test__ = False

    shards: str | None = option(None, "shard folder of the split (python -m regionspot_pl.extract --out)")
    annotations: str | None = option(None, "GT of the split (LVIS/COCO JSON): categories, and the AP reference")
    head: str | None = option(None, "head checkpoint (fit's head.pt, or convert's output); regionspot only")
    clip_model: str | None = option(None, "CLIP folder for the text side (default: the one the shards' manifest names)")
    vocab: str | None = option(None, "class names, one a line, in category-id order (default: the annotations')")
    method: str = option(
        "regionspot", f"regionspot, or a CLIP crop baseline of Table 1 ({', '.join(BASELINES)})", choices=METHODS
    )
    topk: int = option(
        MAX_DETS_PER_IMAGE, f"detections kept per image (at most {MAX_DETS_PER_IMAGE}, what LVIS scores)", minimum=1
    )
    out: str | None = option(None, "output folder (default: runs/test/SPLIT, or runs/test/DATASET of the shards)")
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    images: str | None = option(None, "original images, for the crop baselines (default: the shards' manifest's)")
    batch_size: int | None = option(
        None,
        "images per head batch (regionspot), or crops per CLIP batch (baselines); null: "
        + ", ".join(f"{m} {n}" for m, n in DEFAULT_BATCH.items()),
        minimum=1,
    )
    text_cache: str | None = option(None, "HDF5 text-embedding cache (default: the one the shards' manifest names)")
    workers: int = option(2, "image decoding workers for the crop baselines", minimum=0)
    metric_backend: str = option(
        DEFAULT_BACKEND, "hotcoco, or lvis (the official LVIS API / pycocotools, the reference)", choices=BACKENDS
    )

    def check(self) -> None:
        """The inputs every run needs (cli.Command runs this after parsing; run_test again)."""
        needed = ["shards", "annotations"] + (["head"] if self.method == "regionspot" else [])
        for key in needed:
            if not getattr(self, key):
                raise ConfigError(f"no {key} given: pass --{key.replace('_', '-')} or set '{key}' in the config")

    def batch(self) -> int:
        """--batch-size, or the method's default (``DEFAULT_BATCH``)."""
        return DEFAULT_BATCH[self.method] if self.batch_size is None else self.batch_size


@dataclass
class TestResult:
    """What a run wrote and measured: metrics per IoU type, output files, seconds per step."""

    __test__ = False

    metrics: dict[str, dict[str, float]]
    files: dict[str, str]
    seconds: dict[str, float]


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
# Step 1: inputs, read and checked before any model runs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A run's checked inputs."""

    config: TestConfig
    folder: ShardFolder
    gt: dict
    vocab: Vocabulary
    device: torch.device
    has_masks: bool  # the shards hold a SAM mask per box (not extracted with --no-masks)
    proposals: bool  # the boxes are proposals with scores (extracted with --boxes), not GT boxes
    shard_image_ids: set[int] | None  # None for streamed shards (known only once read)
    images: str | None  # the original images (baselines only)
    clip_dir: str  # the CLIP of the text side (and of the crops)

    @property
    def same_clip(self) -> bool:
        """The text side is the CLIP the shards' features came from."""
        model = self.folder.clip.model
        return not self.config.clip_model or Path(self.clip_dir).resolve() == Path(model).resolve()


def resolve_inputs(config: TestConfig) -> Inputs:
    """Every file of the run read and checked, so that a bad one fails before the models load."""
    folder = ShardFolder.read(config.shards)
    extraction = folder.manifest.config
    has_masks = extraction.get("masks", True) is not False
    if config.method == "clip-mask" and not has_masks:
        raise TestError(
            f"clip-mask needs the SAM masks, but the shards in {folder.folder} were extracted with --no-masks: "
            "re-extract them with masks, or use --method clip-box"
        )
    gt = read_annotations(config.annotations)
    shard_ids = folder.image_ids()
    if shard_ids is not None:
        check_coverage(shard_ids, gt, config.annotations, folder.folder)
    return Inputs(
        config=config,
        folder=folder,
        gt=gt,
        vocab=vocabulary(gt, config.annotations, config.vocab),
        device=resolve_device(config.device),
        has_masks=has_masks,
        proposals=extraction.get("boxes") is not None,
        shard_image_ids=shard_ids,
        images=_image_folder(config, extraction),
        clip_dir=_clip_dir(config, folder),
    )


def read_annotations(path: str) -> dict:
    """The split's COCO/LVIS annotation file, with its 'images' and 'categories'."""
    gt = read_json(path, "annotation file", TestError)
    if not isinstance(gt, dict) or not {"images", "categories"} <= gt.keys():
        raise TestError(f"{path} is not a COCO/LVIS annotation file (no 'images'/'categories'): check --annotations")
    return gt


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


def check_coverage(image_ids: set[int], gt: dict, annotations: str, folder: str) -> None:
    """The shards' images must all be in the annotation file; GT images the shards lack are
    told (their objects count as missed)."""
    gt_ids = {int(im["id"]) for im in gt["images"]}
    outside = sorted(image_ids - gt_ids)
    if outside:
        raise TestError(
            f"{len(outside)} of the {len(image_ids)} images in the shards of {folder} are not in {annotations} "
            f"(ids {', '.join(map(str, outside[:5]))}{', ...' if len(outside) > 5 else ''}): pass the annotation "
            "file the shards were extracted from as --annotations"
        )
    if len(image_ids) < len(gt_ids):
        print(
            f"note: the shards cover {len(image_ids)} of the {len(gt_ids)} images of {annotations}; "
            "objects in the others count as missed"
        )


def _image_folder(config: TestConfig, extraction: dict) -> str | None:
    """The baselines' original images: --images, or the folder the shards were extracted from."""
    if config.method not in BASELINES:
        return None
    images = str(config.images or extraction.get("images") or "")
    if not images or not Path(images).is_dir():
        raise TestError(
            f"image folder {images or '(none)'} not found: the {config.method} baseline crops the original "
            "images; pass --images DIR (the folder the shards were extracted from)"
        )
    return images


def _clip_dir(config: TestConfig, folder: ShardFolder) -> str:
    """The text side's CLIP: the one the shards were extracted with, unless --clip-model names another."""
    clip_dir = str(config.clip_model or folder.clip.model)
    if config.method in BASELINES and not Path(clip_dir).is_dir():
        raise TestError(
            f"CLIP folder not found: {clip_dir} (the {config.method} baseline embeds the crops with CLIP: "
            "pass --clip-model DIR, a Hugging Face CLIP snapshot)"
        )
    return clip_dir


# --------------------------------------------------------------------------------------------
# Step 2: the models (head or CLIP) and the vocabulary's text embeddings
# --------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The head (regionspot) or the CLIP image tower (baselines), and the text embeddings [C, D]."""

    head: RegionSpotHead | None
    encoder: ClipEncoder | None
    texts: Tensor


def build_models(inputs: Inputs) -> Models:
    """Load the head (checked against the shards' CLIP and the text side before any text is
    encoded) or the baseline's CLIP, then embed the vocabulary (through the text cache)."""
    config, clip = inputs.config, inputs.folder.clip
    model_id = clip.id if inputs.same_clip else model_identity(inputs.clip_dir)
    head = encoder = None
    if config.method == "regionspot":
        if model_id != clip.id:
            print(f"note: text embeddings from {inputs.clip_dir}, not the CLIP of the shards' features ({clip.model})")
        head = _load_head(config.head, inputs.device)
        _check_head(head, inputs, clip.text_dim if inputs.same_clip else _config_text_dim(inputs.clip_dir))
    else:
        encoder = ClipEncoder(*load_clip(inputs.clip_dir)).to(inputs.device)
    text_encoder = encoder if encoder is not None else LazyTextEncoder(inputs.clip_dir, inputs.device)
    cache = str(config.text_cache or inputs.folder.manifest.text_cache)
    texts = text_embeddings(text_encoder, list(inputs.vocab.names), cache, model_id)
    if head is not None:
        _check_head(head, inputs, texts.shape[1])
    return Models(head, encoder, texts)


def _load_head(path: str, device: torch.device) -> RegionSpotHead:
    try:
        return load_head(path, map_location=device)
    except CheckpointError as err:  # the same error, naming the flag the file came from
        raise TestError(f"--head {path}: {err}") from err


def _check_head(head: RegionSpotHead, inputs: Inputs, text_dim: int | None) -> None:
    """The head against the shards' CLIP features and the text side (``text_dim`` None: unknown
    before the texts are encoded, checked then)."""
    clip = inputs.folder.clip
    if inputs.same_clip:
        clip_name = f"the shards' CLIP ({clip.model})"
    else:
        clip_name = f"the shards' CLIP features ({clip.model}) with the text side of --clip-model {inputs.clip_dir}"
    text_dim = head.config.text_dim if text_dim is None else text_dim
    check_head_fits(head.config, clip.vision_dim, text_dim, clip_name, f"the head {inputs.config.head}")


def _config_text_dim(clip_dir: str) -> int | None:
    """A CLIP snapshot's joint embedding dim from its config.json, None when unreadable."""
    try:
        return int(json.loads((Path(clip_dir) / "config.json").read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_clip / model_identity will say what is wrong with the folder


# --------------------------------------------------------------------------------------------
# Step 3: logits per image, the head over cached features or CLIP over crops
# --------------------------------------------------------------------------------------------


def logits_stream(inputs: Inputs, models: Models) -> Iterator[ImageLogits]:
    """The method's logits, image by image, in shard order."""
    config, shards = inputs.config, inputs.folder.shards
    if models.head is not None:
        return regionspot_logits(models.head, shards, models.texts, inputs.device, config.batch())
    with_masks = config.method == "clip-mask"
    return baseline_logits(
        models.encoder, shards, models.texts, inputs.images, with_masks, config.batch(), config.workers
    )


def regionspot_logits(
    head: RegionSpotHead, shards: list[str], texts: Tensor, device: torch.device, batch_size: int
) -> Iterator[ImageLogits]:
    """The head over the cached split, ``batch_size`` images at a time (boxes padded).

    Padded queries are masked out of the self-attention, so an image's logits do not depend
    on the batch it lands in.
    """
    texts = texts.to(device)
    for chunk in batched(iter_samples(shards), batch_size):
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
        for s in iter_samples(mine) if mine else ():
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
# Step 4: scoring, (box, class) pairs ranked per image
# --------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """Every image's kept detections, and what the pass saw and took."""

    detections: list[ImageDetections]
    image_ids: set[int]
    boxes: int
    seconds: float


def score_images(stream: Iterator[ImageLogits], inputs: Inputs) -> Scored:
    """Run the stream and keep each image's best ``topk`` (box, class) pairs."""
    config = inputs.config
    topk = config.topk
    if topk > MAX_DETS_PER_IMAGE:
        print(f"note: --topk {topk} capped at {MAX_DETS_PER_IMAGE}, the most the LVIS protocol scores per image")
        topk = MAX_DETS_PER_IMAGE
    total = (inputs.folder.counts or {}).get("samples")
    scored = Scored([], set(), 0, 0.0)
    start = time.perf_counter()
    progress = tqdm(stream, total=total, desc=f"test {config.method}", unit="img", dynamic_ncols=True, disable=None)
    for item in progress:
        scored.image_ids.add(item.image_id)
        if len(item.boxes) == 0:
            continue
        scored.boxes += len(item.boxes)
        box_scores = torch.from_numpy(item.scores) if inputs.proposals else None  # GT boxes: probability only
        box_idx, class_idx, scores = score_regions(item.logits, box_scores, topk)
        scored.detections.append(ImageDetections(item.image_id, item.boxes, box_idx, class_idx, scores, item.masks))
    scored.seconds = time.perf_counter() - start
    what = "head pass" if config.method == "regionspot" else f"{config.method} CLIP pass"
    rate = len(scored.image_ids) / max(scored.seconds, 1e-9)
    print(
        f"{what}: {scored.seconds:.1f} s for {len(scored.image_ids)} images, {scored.boxes} boxes "
        f"({rate:.1f} img/s, {inputs.device})"
    )
    if inputs.shard_image_ids is None:  # streamed shards: their images are known only now
        check_coverage(scored.image_ids, inputs.gt, config.annotations, inputs.folder.folder)
    return scored


# --------------------------------------------------------------------------------------------
# Step 5: outputs, detections, metrics and the report
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


def write_outputs(inputs: Inputs, scored: Scored) -> TestResult:
    """OUT/detections_{bbox,segm}.json, their AP in OUT/metrics.json, and the report."""
    config = inputs.config
    out = Path(config.out or f"runs/test/{inputs.folder.name}")
    out.mkdir(parents=True, exist_ok=True)
    iou_types = ["bbox", "segm"] if inputs.has_masks else ["bbox"]
    if not inputs.has_masks:
        print(
            f"note: the shards in {config.shards} were extracted with --no-masks: no mask AP, no detections_segm.json"
        )
        (out / "detections_segm.json").unlink(missing_ok=True)  # not a stale file of an earlier run
    files: dict[str, Path] = {}
    evaluations: dict[str, Evaluation] = {}
    start = time.perf_counter()
    for iou_type in iou_types:
        files[iou_type], evaluation = _write_and_evaluate(inputs, scored, out, iou_type)
        if evaluation is not None:
            evaluations[iou_type] = evaluation
    metric_s = time.perf_counter() - start
    metrics = {t: e.metrics for t, e in evaluations.items()}
    print(f"metric step: {metric_s:.1f} s ({', '.join(metrics)})")
    files["metrics"] = write_json_atomic(out / "metrics.json", _json_metrics(metrics), indent=2)
    if evaluations:  # report.md, ap_per_class.png/.csv: what was evaluated, per-class AP
        files.update(write_report(out, evaluations, inputs.gt, _sources(inputs, files, evaluations), seconds=metric_s))
    return TestResult(metrics, {k: str(v) for k, v in files.items()}, {"pass": scored.seconds, "metrics": metric_s})


def _write_and_evaluate(inputs: Inputs, scored: Scored, out: Path, iou_type: str) -> tuple[Path, Evaluation | None]:
    """One IoU type's detections file and its evaluation (None: the GT has no masks to score)."""
    config = inputs.config
    results = results_of(scored.detections, inputs.vocab.category_ids, with_masks=iou_type == "segm")
    path = write_json_atomic(out / f"detections_{iou_type}.json", results, indent=None)
    if iou_type == "segm" and not all("segmentation" in a for a in inputs.gt.get("annotations", [])):
        print(f"note: {config.annotations} has annotations without 'segmentation': no mask AP")
        return path, None
    try:  # evaluate_results pauses the garbage collector itself (LVIS-sized result lists)
        return path, evaluate_results(
            inputs.gt, results, iou_type=iou_type, max_dets=MAX_DETS_PER_IMAGE, backend=config.metric_backend
        )
    except EvaluationInputError as err:  # the same error, naming the flag the file came from
        raise TestError(f"{iou_type} evaluation against --annotations {config.annotations}: {err}") from err


def _sources(inputs: Inputs, files: dict[str, Path], evaluations: dict[str, Evaluation]) -> dict[str, str]:
    """What was evaluated, for the report."""
    config = inputs.config
    model = (
        {"head": config.head}
        if config.method == "regionspot"
        else {"method": f"{config.method} (CLIP {inputs.clip_dir})"}
    )
    return {
        "ground truth": config.annotations,
        "shards": config.shards,
        **model,
        "results": ", ".join(str(files[t]) for t in evaluations),
    }


def _json_metrics(metrics: dict[str, dict[str, float]]) -> dict:
    """Every LVIS key per IoU type; NaN (nothing to score) and keys COCO lacks become null."""

    def value(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else float(v)

    return {t: {k: value(m.get(k)) for k in LVIS_METRICS} for t, m in metrics.items()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_test(config: TestConfig) -> TestResult:
    """Evaluate as configured. Raises a :class:`RegionSpotError` for bad input."""
    config.check()
    inputs = resolve_inputs(config)
    models = build_models(inputs)
    scored = score_images(logits_stream(inputs, models), inputs)
    return write_outputs(inputs, scored)
