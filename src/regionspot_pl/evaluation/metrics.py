"""Box and mask AP of detections in COCO/LVIS results format: hotcoco, or the official libraries.

RegionSpot is scored on LVIS v1 val with the LVIS protocol: AP over IoU 0.50:0.95, at most 300
detections per image, and the AP of the rare / common / frequent category splits. Two backends
compute it:

- ``hotcoco`` (default): a Rust implementation of the LVIS API and of pycocotools' ``COCOeval``
  (package ``hotcoco``). It gives the LVIS API's numbers (the tests hold the two equal to 1e-6 on
  varied sets, box and mask) in a small fraction of the time, which is what makes scoring LVIS
  val inside a training run affordable (docs/benchmarks.md).
- ``lvis``: the reference, the official libraries themselves: the LVIS API (``lvis`` package)
  for LVIS data, pycocotools' ``COCOeval`` for COCO-style data (no ``frequency`` on the
  categories), which the LVIS API cannot score.

This module is the public face: :func:`evaluate_results` checks the inputs (:mod:`.inputs`: the
ground truth through the package's one annotation reader, then the detections), runs a backend
(:mod:`.backends`) and returns the metrics with the per-class AP, computed the same way for every
backend; :func:`format_metrics_table` prints them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.annotations import GroundTruth
from .backends import COCO_METRICS, LVIS_METRICS, run_backend
from .inputs import (
    EvaluationInputError,
    GroundTruthError,
    ResultsError,
    check_evaluable,
    gc_paused,
    load_ground_truth,
    load_results,
    result_columns,
    validate_results,
)

__all__ = [
    "BACKENDS",
    "COCO_METRICS",
    "DEFAULT_BACKEND",
    "IOU_TYPES",
    "KINDS",
    "LVIS_METRICS",
    "Evaluation",
    "EvaluationInputError",
    "GroundTruthError",
    "ResultsError",
    "check_backend",
    "evaluate_detections",
    "evaluate_results",
    "format_metrics_table",
    "load_ground_truth",
    "load_results",
    "per_class_ap",
]

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
KINDS: tuple[str, ...] = ("auto", "lvis", "coco")
BACKENDS: tuple[str, ...] = ("hotcoco", "lvis")
DEFAULT_BACKEND = "hotcoco"


@dataclass(frozen=True)
class Evaluation:
    """One evaluator run: the summary metrics and the AP of every category.

    ``per_class_ap[k]`` is the AP of category ``category_ids[k]``: the evaluator's precision
    array (IoU thresholds x recall thresholds x categories x area ranges [x detection caps]) at
    area "all" and the largest cap, averaged over IoU and recall thresholds, ignoring the -1
    entries the libraries write where a category has no ground truth (NaN then). It is computed
    the same way for every backend.
    """

    iou_type: str  # "bbox" or "segm"
    kind: str  # "lvis" or "coco" (after "auto" was resolved)
    backend: str  # "hotcoco" or "lvis"
    max_dets: int
    metrics: dict[str, float]  # as evaluate_detections returns them
    category_ids: np.ndarray  # int64 [K], the evaluator's category axis (every GT category, sorted)
    per_class_ap: np.ndarray  # float64 [K], fractions in [0, 1], NaN without ground truth
    num_images: int  # images in the ground truth (all are evaluated)
    num_detections: int  # detections given, before the per-image cap


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def evaluate_detections(
    gt: str | Path | Mapping[str, Any] | GroundTruth,
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    **options: Any,
) -> dict[str, float]:
    """Score detections against ground truth; the summary metrics of :func:`evaluate_results`
    (``options``: its ``kind``, ``max_dets``, ``verbose`` and ``backend``).

    Args:
        gt: COCO/LVIS annotation JSON (path, the loaded dict, or a checked GroundTruth, which is
            not read or checked again). Not modified.
        results: detections, a JSON list (path or list) of ``{"image_id", "category_id",
            "bbox": [x, y, w, h], "score"}``, plus ``"segmentation"`` (compressed RLE) for
            ``iou_type="segm"`` (where ``bbox`` may be left out: areas then come from the
            masks, as in the LVIS API). Not modified.
        iou_type: "bbox" (box AP) or "segm" (mask AP).
        kind: "lvis" (federated LVIS evaluation), "coco" (COCOeval) or "auto": "lvis" when every
            GT category carries a ``frequency`` field, else "coco".
        max_dets: detection cap. LVIS keeps the ``max_dets`` best-scored detections of each
            image (official value 300). COCO applies it per image *and category*, as
            ``COCOeval.params.maxDets[-1]``; the official COCO value is 100.
        verbose: let the libraries print their progress and their own summary to stdout.
        backend: "hotcoco" (default, fast) or "lvis" (the official libraries, the reference).

    Returns:
        Fractions in [0, 1]. LVIS: AP, AP50, AP75, APs, APm, APl, APr, APc, APf.
        COCO: the first six only (APr/APc/APf are absent: COCO has no frequency splits).
        A metric with no ground truth to score (e.g. no small objects, no rare category
        present) is NaN, where the libraries return -1.

    Raises:
        GroundTruthError, ResultsError (both RegionSpotError and ValueError): input the evaluators
        cannot score.
        ValueError: a bad ``iou_type``, ``kind``, ``max_dets`` or ``backend``.
    """
    return evaluate_results(gt, results, iou_type, **options).metrics


def evaluate_results(
    gt: str | Path | Mapping[str, Any] | GroundTruth,
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    kind: str = "auto",
    max_dets: int = 300,
    verbose: bool = False,
    backend: str = DEFAULT_BACKEND,
    inputs_owned: bool = False,
) -> Evaluation:
    """Score detections against ground truth: summary metrics and per-class AP.

    Arguments and errors as :func:`evaluate_detections`, plus ``inputs_owned``: the caller
    hands ``gt`` and ``results`` over and will not use them again, so the official libraries
    may write into them instead of into copies (much less memory at LVIS val size,
    docs/benchmarks.md; hotcoco never writes into them). Python's cyclic garbage collector is
    paused while the libraries run (:func:`.inputs.gc_paused`).
    """
    _check_options(iou_type, kind, max_dets, backend)
    with gc_paused():
        gt = load_ground_truth(gt)
        kind = gt.kind if kind == "auto" else kind
        check_evaluable(gt, iou_type, kind)
        dets = load_results(results)
        columns = result_columns(dets, gt, iou_type)
        if columns is None:  # something is off, or unusual: the entry-by-entry check says what
            validate_results(dets, gt, iou_type)
        backend = _backend_for(gt, kind, backend)
        if backend != "hotcoco":
            columns = None  # the official libraries read the dicts: the array is freed first
        metrics, precision, cat_ids = run_backend(
            backend, gt.data, dets, columns, (iou_type, kind, max_dets), verbose, inputs_owned
        )
    return Evaluation(
        iou_type=iou_type,
        kind=kind,
        backend=backend,
        max_dets=max_dets,
        metrics=metrics,
        category_ids=np.asarray(cat_ids, dtype=np.int64),
        per_class_ap=per_class_ap(precision),
        num_images=len(gt.images),
        num_detections=len(dets),
    )


def _check_options(iou_type: str, kind: str, max_dets: int, backend: str) -> None:
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    check_backend(backend)


def check_backend(backend: str) -> str:
    """``backend`` if it names a metric backend; a ValueError that lists them otherwise."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown metric backend {backend!r}: use 'hotcoco' (fast, the default) or 'lvis' "
            "(the official LVIS API / pycocotools, the reference)"
        )
    return backend


def _backend_for(gt: GroundTruth, kind: str, backend: str) -> str:
    """The backend to run: the LVIS API for LVIS ground truth with 'ignore' flags, which the
    LVIS API honours (an ignored object neither counts as missed nor makes a false positive)
    and hotcoco does not read. LVIS v1 has no such flags; converted data might."""
    if backend != "hotcoco" or kind != "lvis":
        return backend
    flagged = sum(1 for a in gt.annotations if a.get("ignore"))
    if flagged:
        warnings.warn(
            f"{flagged} ground-truth annotations carry 'ignore', which hotcoco does not read: "
            "scoring with the LVIS API instead (as --metric_backend lvis; slower)",
            stacklevel=3,
        )
        return "lvis"
    return backend


def per_class_ap(precision: np.ndarray) -> np.ndarray:
    """[K] AP per category from an evaluator's precision array, NaN where it has no ground truth.

    Args:
        precision: [T, R, K, A] (LVIS API) or [T, R, K, A, M] (COCOeval, hotcoco) precision at
            T IoU thresholds, R recall thresholds, K categories, A area ranges ("all" first)
            and M detection caps (the largest last); -1 where nothing was there to score.
    """
    p = np.asarray(precision, dtype=np.float64)
    if p.ndim == 5:
        p = p[..., -1]
    if p.ndim != 4:
        raise ValueError(f"precision must be [T, R, K, A] or [T, R, K, A, M], got shape {p.shape}")
    p = p[:, :, :, 0]  # area "all": index 0 in both libraries' area_rng_lbl
    valid = p > -1
    counts = valid.sum(axis=(0, 1))
    sums = np.where(valid, p, 0.0).sum(axis=(0, 1))
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def format_metrics_table(metrics: Mapping[str, Mapping[str, float]], scoring: str | None = None) -> str:
    """A small text table: one row per IoU type (e.g. bbox, segm), AP columns in percent.

    Args:
        metrics: ``{iou_type: evaluate_detections(...)}``. Missing or NaN values print as "-".
        scoring: the rule that ranked the detections, printed as the first line when given.
    """
    header = ["", *LVIS_METRICS]
    rows = [header]
    for iou_type, values in metrics.items():
        cells = [iou_type]
        for key in LVIS_METRICS:
            value = values.get(key)
            ok = value is not None and not math.isnan(value)
            cells.append(f"{100.0 * value:.1f}" if ok else "-")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(max(w, 5)) for cell, w in zip(row[1:], widths[1:]))
        lines.append("  ".join([first, *rest]))
    return "\n".join(([f"scoring: {scoring}"] if scoring else []) + lines)


# --------------------------------------------------------------------------------------------
# Running the libraries. Each returns (metrics, precision array, category ids of its K axis).
