"""Zero-shot test of a head (or a CLIP crop baseline) on a cached split: the library behind
``python -m regionspot_pl.test`` (:mod:`regionspot_pl.test` is its command line).

Boxes come from the shards: GT boxes, or proposals when the shards were extracted with
``--boxes``; the model only names them. Each (box, class) pair is scored by the softmax over the
vocabulary (times the box's score: the proposal score, 1 for GT boxes) and each image keeps its
best pairs, at most 300 (LVIS protocol); or, with ``--scoring tap``, by TAP's multi-label rule
(:mod:`.scoring`). The rule is recorded in metrics.json and the report.

:func:`run_test` reads top-down as its steps: :func:`.prepare.resolve_inputs` (files read and
checked before any model runs), :func:`.prepare.build_models` (head or CLIP, text embeddings), the
logits stream (:func:`.logits.regionspot_logits` or :func:`.logits.baseline_logits`),
:func:`score_images` (:func:`.scoring.detect`, as fit's validation) and :func:`write_outputs`
(detections, metrics.json, report).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..utils.io import write_json_atomic
from .inputs import EvaluationInputError
from .logits import ImageLogits, baseline_logits, regionspot_logits
from .metrics import Evaluation, evaluate_results
from .prepare import Inputs, Models, build_models, note_uncovered, resolve_inputs
from .report import write_metrics, write_report
from .saved_logits import LOGITS_FILE, LogitsWriter
from .scoring import MAX_DETS_PER_IMAGE, SCORING_NAMES, ImageDetections, image_detections
from .settings import DEFAULT_BATCH, METHODS, TestConfig, TestError

__all__ = [
    "DEFAULT_BATCH",
    "METHODS",
    "TestConfig",
    "TestError",
    "TestResult",
    "baseline_logits",
    "regionspot_logits",
    "run_test",
]


@dataclass
class TestResult:
    """What a run wrote and measured: metrics per IoU type, output files, seconds per step, and
    the scoring rule the metrics are of."""

    __test__ = False

    metrics: dict[str, dict[str, float]]
    files: dict[str, str]
    seconds: dict[str, float]
    scoring: str = "regionspot"


def logits_stream(inputs: Inputs, models: Models) -> Iterator[ImageLogits]:
    """The method's logits, image by image, in shard order."""
    config, shards = inputs.config, inputs.folder.shards
    if models.head is not None:
        return regionspot_logits(models.head, shards, models.texts, inputs.device, config.batch())
    with_masks = config.method == "clip-mask"
    return baseline_logits(
        models.encoder, shards, models.texts, inputs.images, with_masks, config.batch(), config.workers
    )


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
    logits: LogitsWriter | None = None  # every image's logits, with --save_logits


def score_images(stream: Iterator[ImageLogits], inputs: Inputs) -> Scored:
    """Run the stream and keep each image's best ``topk`` (box, class) pairs."""
    config = inputs.config
    topk = config.topk
    if topk > MAX_DETS_PER_IMAGE:
        print(f"note: --topk {topk} capped at {MAX_DETS_PER_IMAGE}, the most the LVIS protocol scores per image")
        topk = MAX_DETS_PER_IMAGE
    if config.scoring == "tap" and inputs.folder.manifest.config.get("boxes"):
        print(
            f"note: the shards in {config.shards} hold proposals: --scoring tap ranks them without their "
            "proposal scores, as TAP's rule (written for GT boxes) does"
        )
    total = (inputs.folder.counts or {}).get("samples")
    scored = Scored([], set(), 0, 0.0, LogitsWriter(inputs.vocab.category_ids) if config.save_logits else None)
    start = time.perf_counter()
    progress = tqdm(stream, total=total, desc=f"test {config.method}", unit="img", dynamic_ncols=True, disable=None)
    for item in progress:
        scored.image_ids.add(item.image_id)
        if scored.logits is not None:
            scored.logits.add(item)
        if len(item.boxes) == 0:
            continue
        scored.boxes += len(item.boxes)
        scored.detections.append(image_detections(item, config.scoring, topk))
    scored.seconds = time.perf_counter() - start
    what = "head pass" if config.method == "regionspot" else f"{config.method} CLIP pass"
    rate = len(scored.image_ids) / max(scored.seconds, 1e-9)
    print(
        f"{what}: {scored.seconds:.1f} s for {len(scored.image_ids)} images, {scored.boxes} boxes "
        f"({rate:.1f} img/s, {inputs.device})"
    )
    if inputs.shard_image_ids is None:  # streamed shards: their images are known only now
        note_uncovered(inputs.gt, scored.image_ids, inputs.folder.folder)
    return scored


# --------------------------------------------------------------------------------------------
# Step 5: outputs, detections, metrics and the report
# --------------------------------------------------------------------------------------------


def write_outputs(inputs: Inputs, scored: Scored) -> TestResult:
    """OUT/detections_{bbox,segm}.json, their AP in OUT/metrics.json, and the report."""
    config = inputs.config
    out = Path(config.out or f"runs/test/{inputs.folder.name}")
    out.mkdir(parents=True, exist_ok=True)
    iou_types = ["bbox", "segm"] if inputs.has_masks else ["bbox"]
    if not inputs.has_masks:
        print(
            f"note: the shards in {config.shards} were extracted with --masks false: "
            "no mask AP, no detections_segm.json"
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
    files["metrics"] = write_metrics(out, evaluations, scoring=config.scoring)
    if scored.logits is not None:
        files["logits"] = scored.logits.write(out / LOGITS_FILE)
    if evaluations:  # report.md, ap_per_class.png/.csv: what was evaluated, per-class AP
        sources = _sources(inputs, files, evaluations)
        files.update(write_report(out, evaluations, inputs.gt.data, sources, seconds=metric_s))
    seconds = {"pass": scored.seconds, "metrics": metric_s}
    return TestResult(metrics, {k: str(v) for k, v in files.items()}, seconds, config.scoring)


def _write_and_evaluate(inputs: Inputs, scored: Scored, out: Path, iou_type: str) -> tuple[Path, Evaluation | None]:
    """One IoU type's detections file and its evaluation (None: the GT has no masks to score)."""
    config = inputs.config
    with_masks = iou_type == "segm"
    results = [r for d in scored.detections for r in d.results(inputs.vocab.category_ids, with_masks)]
    path = write_json_atomic(out / f"detections_{iou_type}.json", results, indent=None)
    if with_masks and not all("segmentation" in a for a in inputs.gt.annotations):
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
        "scoring": SCORING_NAMES[config.scoring],
        "results": ", ".join(str(files[t]) for t in evaluations),
    }


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
