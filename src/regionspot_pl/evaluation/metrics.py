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

This module adds what the libraries lack: input validation with errors that say what to fix,
in-memory ground truth, quiet runs, per-class AP, and a NumPy >= 1.24 workaround for ``lvis``
0.5.3.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RegionSpotError
from ..utils.io import read_json

# Keys of the dict returned by evaluate_detections, in table order.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS: tuple[str, ...] = COCO_METRICS + ("APr", "APc", "APf")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
KINDS: tuple[str, ...] = ("auto", "lvis", "coco")
BACKENDS: tuple[str, ...] = ("hotcoco", "lvis")
DEFAULT_BACKEND = "hotcoco"

# How many offending ids / entries an error message lists before it says "...".
_SHOW = 10


class EvaluationInputError(RegionSpotError, ValueError):
    """Ground truth or results that the evaluators cannot score (base class)."""


class GroundTruthError(EvaluationInputError):
    """The ground-truth annotations are missing, unreadable or lack fields the evaluator needs."""


class ResultsError(EvaluationInputError):
    """The detections are empty, malformed, or refer to images / categories absent from the GT."""


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
    gt: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    **options: Any,
) -> dict[str, float]:
    """Score detections against ground truth; the summary metrics of :func:`evaluate_results`
    (``options``: its ``kind``, ``max_dets``, ``verbose`` and ``backend``).

    Args:
        gt: COCO/LVIS annotation JSON (path or the loaded dict). Not modified.
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
    gt: str | Path | Mapping[str, Any],
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
    paused while the libraries run: they allocate millions of small objects, and each burst
    makes the collector rescan everything alive (reference counting still frees memory).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    check_backend(backend)

    with _gc_paused():
        gt_dict = load_ground_truth(gt)
        if kind == "auto":
            kind = _infer_kind(gt_dict)
        _validate_gt(gt_dict, iou_type, kind)
        dets = load_results(results)
        columns = _result_columns(dets, gt_dict, iou_type)
        if columns is None:  # something is off, or unusual: the entry-by-entry check says what
            _validate_results(dets, gt_dict, iou_type)
        backend = _backend_for(gt_dict, kind, backend)
        num_detections = len(dets)
        with _quiet(not verbose):
            if backend == "hotcoco":
                metrics, precision, cat_ids = _run_hotcoco(gt_dict, dets, columns, iou_type, kind, max_dets)
            else:
                del columns  # the official libraries read the dicts: free the array first
                if not inputs_owned:
                    gt_dict, dets = _copies(gt_dict, dets)
                if iou_type == "bbox":
                    _share_a_placeholder_mask(dets)
                run = _run_lvis if kind == "lvis" else _run_coco
                metrics, precision, cat_ids = run(gt_dict, dets, iou_type, max_dets, verbose)
    return Evaluation(
        iou_type=iou_type,
        kind=kind,
        backend=backend,
        max_dets=max_dets,
        metrics=metrics,
        category_ids=np.asarray(cat_ids, dtype=np.int64),
        per_class_ap=per_class_ap(precision),
        num_images=len(gt_dict["images"]),
        num_detections=num_detections,
    )


def check_backend(backend: str) -> str:
    """``backend`` if it names a metric backend; a ValueError that lists them otherwise."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown metric backend {backend!r}: use 'hotcoco' (fast, the default) or 'lvis' "
            "(the official LVIS API / pycocotools, the reference)"
        )
    return backend


def _backend_for(gt: Mapping[str, Any], kind: str, backend: str) -> str:
    """The backend to run: the LVIS API for LVIS ground truth with 'ignore' flags, which the
    LVIS API honours (an ignored object neither counts as missed nor makes a false positive)
    and hotcoco does not read. LVIS v1 has no such flags; converted data might."""
    if backend != "hotcoco" or kind != "lvis":
        return backend
    flagged = sum(1 for a in gt["annotations"] if a.get("ignore"))
    if flagged:
        warnings.warn(
            f"{flagged} ground-truth annotations carry 'ignore', which hotcoco does not read: "
            "scoring with the LVIS API instead (as --metric-backend lvis; slower)",
            stacklevel=3,
        )
        return "lvis"
    return backend


def load_ground_truth(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The annotation dict of a COCO/LVIS JSON file (or of a dict), checked for its three lists.

    Raises GroundTruthError naming the file and what is wrong with it.
    """
    with _gc_paused():
        return _load_gt(gt)


def load_results(results: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The detections of a results JSON file (or of a list), as a non-empty list.

    Raises ResultsError naming the file and what is wrong with it.
    """
    with _gc_paused():  # json.load of LVIS-sized results is faster without collections (docs/benchmarks.md)
        return _load_results(results)


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


def format_metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A small text table: one row per IoU type (e.g. bbox, segm), AP columns in percent.

    Args:
        metrics: ``{iou_type: evaluate_detections(...)}``. Missing or NaN values print as "-".
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running the libraries. Each returns (metrics, precision array, category ids of its K axis).
# --------------------------------------------------------------------------------------------

_Run = tuple[dict[str, float], np.ndarray, list[int]]


def _copies(gt: dict[str, Any], dets: list[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Copies the official libraries may write into ("ignore", "id", "area", a rasterized
    "segmentation"), so that the caller's data stays intact. A shallow copy per dict suffices,
    they only assign keys; a deepcopy of LVIS val is slow."""
    return {**gt, "annotations": [dict(a) for a in gt["annotations"]]}, [dict(d) for d in dets]


# One object for every box result: box evaluation never reads a result's 'segmentation'.
_UNUSED_MASK: list[list[float]] = []


def _share_a_placeholder_mask(dets: list[dict[str, Any]]) -> None:
    """Give box results without a 'segmentation' the one shared placeholder, in place.

    LVISResults and COCO.loadRes give each such result a polygon of its box (two lists and eight
    floats per result, gigabytes at LVIS val size) that box evaluation never reads; with a
    'segmentation' present they add none. The numbers do not change (the tests compare them
    with hotcoco's); the LVIS API's peak memory drops by that much (docs/benchmarks.md).
    """
    for det in dets:
        if "segmentation" not in det:
            det["segmentation"] = _UNUSED_MASK


def _run_hotcoco(
    gt: dict[str, Any],
    dets: list[Mapping[str, Any]],
    columns: np.ndarray | None,
    iou_type: str,
    kind: str,
    max_dets: int,
) -> _Run:
    import hotcoco

    # Boxes go in as one [N, 7] array when the fast check could build it: no Rust object per
    # Python dict, so they load faster. Masks go in as the dicts: a result without a 'bbox' then
    # takes its area and box from its mask, as in the official libraries.
    res: Any = columns if columns is not None and iou_type == "bbox" else dets
    cap: int | None = max_dets
    if kind == "lvis":
        gt, res, cap = _as_the_lvis_api_reads_them(gt, res, iou_type, max_dets)
    # hotcoco copies everything into its own (Rust) structures: the caller's dicts stay as given.
    coco_gt = hotcoco.COCO(gt)
    if kind == "lvis":
        # The LVIS per-image cap. As in the LVIS API, the evaluator scores these results as they
        # are: its params.max_dets only labels the AR lines.
        coco_dt = hotcoco.LVISResults(coco_gt, res, max_dets=-1 if cap is None else cap)
        evaluator = hotcoco.COCOeval(coco_gt, coco_dt, iou_type, lvis_style=True)
    else:
        evaluator = hotcoco.COCOeval(coco_gt, coco_gt.load_res(res), iou_type)
        evaluator.params.max_dets = [1, 10, max_dets]  # as _run_coco: AP at the last cap
    evaluator.evaluate()
    evaluator.accumulate()
    with warnings.catch_warnings():
        # "max_dets differ from expected": about the AR lines' labels, which are not used here
        warnings.filterwarnings("ignore", message="hotcoco: max_dets differ")
        evaluator.summarize()
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.cat_ids)
    if kind == "lvis":
        results = evaluator.get_results()
        return {key: _fraction(results[key]) for key in LVIS_METRICS}, precision, cat_ids
    stats = _coco_stats(evaluator.stats, precision, max_dets)
    return {key: _fraction(stats[i]) for i, key in enumerate(COCO_METRICS)}, precision, cat_ids


def _as_the_lvis_api_reads_them(
    gt: dict[str, Any], res: list[Mapping[str, Any]] | np.ndarray, iou_type: str, max_dets: int
) -> tuple[dict[str, Any], list[Mapping[str, Any]] | np.ndarray, int | None]:
    """GT and results for hotcoco, with what the LVIS API reads differently made explicit.

    - ``iscrowd``: the LVIS API ignores it (a crowd annotation is an ordinary object); hotcoco
      would score it as a COCO crowd region. Given to hotcoco as 0.
    - Area outside (0, inf): the LVIS API leaves such annotations and detections out
      (``LVIS.get_ann_ids`` keeps 0 < area < inf), e.g. a polygon too thin to cover a pixel or
      an empty mask; hotcoco keeps them. Left out here, the detections after the per-image cap
      (LVISResults caps before the evaluator filters), so the cap is applied here then and the
      returned cap is None.

    Returns (gt, results, cap): the inputs unchanged when none of this occurs (the usual case).
    """
    anns = gt["annotations"]
    if any(a.get("iscrowd") or not 0 < a["area"] < math.inf for a in anns):
        anns = [{**a, "iscrowd": 0} if a.get("iscrowd") else a for a in anns if 0 < a["area"] < math.inf]
        gt = {**gt, "annotations": anns}
    zero = _zero_area(res, iou_type)
    if not zero.any():
        return gt, res, max_dets
    if isinstance(res, np.ndarray):
        image_ids, scores = res[:, 0], res[:, 5]
    else:
        image_ids = np.array([d["image_id"] for d in res], dtype=np.float64)
        scores = np.array([d["score"] for d in res], dtype=np.float64)
    keep = _capped(image_ids, scores, max_dets) & ~zero
    kept = res[keep] if isinstance(res, np.ndarray) else [d for d, k in zip(res, keep) if k]
    return gt, kept, None


def _zero_area(res: list[Mapping[str, Any]] | np.ndarray, iou_type: str) -> np.ndarray:
    """bool [N]: the results whose area, as the LVIS API computes it, is not in (0, inf).

    LVISResults takes a result's area from its box (w * h) when the results carry boxes, and
    from its mask otherwise. A mask is empty only if its RLE is a single run, whose compressed
    string has at most 7 characters (for images below 2**34 pixels): only such short ones are
    decoded, so the check costs little on LVIS-sized results.
    """
    if isinstance(res, np.ndarray):
        area = res[:, 3] * res[:, 4]
        return ~((area > 0) & (area < math.inf))
    if iou_type == "bbox" or "bbox" in res[0]:
        area = np.array([d["bbox"][2] * d["bbox"][3] for d in res], dtype=np.float64)
        return ~((area > 0) & (area < math.inf))
    from pycocotools import mask as mask_utils

    zero = np.zeros(len(res), dtype=bool)
    for i, d in enumerate(res):
        counts = d["segmentation"]["counts"]
        if not isinstance(counts, str | bytes) or len(counts) <= 7:
            zero[i] = not mask_utils.area(d["segmentation"]) > 0  # the call LVISResults makes
    return zero


def _capped(image_ids: np.ndarray, scores: np.ndarray, max_dets: int) -> np.ndarray:
    """bool [N]: the ``max_dets`` best-scored results of each image, ties in input order (as
    LVISResults.limit_dets_per_image, a stable sort)."""
    n = len(scores)
    order = np.lexsort((np.arange(n), -scores, image_ids))  # by image, score down, then position
    sorted_ids = image_ids[order]
    starts = np.r_[0, np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    keep = np.zeros(n, dtype=bool)
    keep[order[rank < max_dets]] = True
    return keep


def _run_lvis(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int, verbose: bool) -> _Run:
    # Imported here: importing ``lvis`` calls logging.basicConfig() on the root logger, a side
    # effect that users of the rest of the package (or COCO-only data) should not pay for.
    from lvis import LVIS, LVISEval, LVISResults

    class _InMemoryLVIS(LVIS):
        """LVIS() only reads a path; this takes the already loaded (and validated) dict."""

        def __init__(self, dataset: dict[str, Any]) -> None:
            self.logger = logging.getLogger(LVIS.__module__)
            self.dataset = dataset
            self._create_index()

    lvis_gt = _InMemoryLVIS(gt)
    # LVISResults keeps the max_dets best detections of each image; LVISEval would build it
    # with its default of 300 whatever we ask, so build it here with ours.
    lvis_dt = LVISResults(lvis_gt, dets, max_dets=max_dets)
    evaluator = LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
    evaluator.params.max_dets = max_dets  # only used by print_results, keep it truthful
    evaluator.evaluate()
    # evaluate() leaves three dicts with an entry per (image, category) pair, which accumulate()
    # does not read (it reads eval_imgs): gigabytes at LVIS val size. Freed before accumulate()
    # allocates its own, so the LVIS API's peak memory stays lower (docs/benchmarks.md).
    evaluator.ious, evaluator._gts, evaluator._dts = {}, {}, {}
    with _numpy_float_alias():
        evaluator.accumulate()
    evaluator.summarize()
    if verbose:
        evaluator.print_results()
    results = evaluator.get_results()
    metrics = {key: _fraction(results[key]) for key in LVIS_METRICS}
    return metrics, evaluator.eval["precision"], list(evaluator.params.cat_ids)


def _run_coco(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int, verbose: bool) -> _Run:
    del verbose  # COCOeval prints its summary anyway; _quiet decides whether it is seen
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dets)
    evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
    # summarize() reports AP at maxDets[-1] (stats[0:6]); the smaller caps only enter AR.
    evaluator.params.maxDets = [1, 10, max_dets]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    precision = evaluator.eval["precision"]
    stats = _coco_stats(evaluator.stats, precision, max_dets)
    metrics = {key: _fraction(stats[i]) for i, key in enumerate(COCO_METRICS)}
    return metrics, precision, list(evaluator.params.catIds)


def _coco_stats(stats: Sequence[float], precision: np.ndarray, max_dets: int) -> list[float]:
    """COCOeval's first six stats, with AP (stats[0]) redone at our detection cap.

    summarize() computes stats[0] at a hard-coded maxDets=100 (its _summarize default) and
    finds -1 when 100 is not in params.maxDets; stats[1:6] do use maxDets[-1]. Redo stats[0]
    the way _summarize does: mean precision [T, R, K, A, M] over IoUs, recall thresholds and
    categories, area "all" (index 0), the last maxDets, ignoring -1 entries.
    """
    stats = [float(v) for v in stats[: len(COCO_METRICS)]]
    if max_dets != 100:
        at_cap = np.asarray(precision)[:, :, :, 0, -1]
        valid = at_cap[at_cap > -1]
        stats[0] = float(valid.mean()) if valid.size else -1.0
    return stats


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (nested uses are fine)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _numpy_float_alias() -> Iterator[None]:
    """Provide ``np.float`` (= builtin float) only while the block runs, then remove it again.

    lvis 0.5.3 casts with ``np.float`` in ``LVISEval.accumulate``; NumPy 1.24 removed that alias.
    The alternatives are worse: editing the installed package is not reproducible, and
    overriding ``accumulate`` in a subclass means carrying a copy of 70 lines of the
    official metric code. Scoping the alias to the one call keeps NumPy as users expect it
    everywhere else (not thread-safe, but the evaluator itself is single-threaded).
    """
    if "float" in vars(np):  # NumPy < 1.24 still has it: nothing to patch, nothing to undo
        yield
        return
    np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.float  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence the libraries: pycocotools and hotcoco print to stdout, lvis logs (and warns)
    via logging."""
    if not enabled:
        yield
        return
    lvis_logger = logging.getLogger("lvis")
    level = lvis_logger.level
    lvis_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        lvis_logger.setLevel(level)


def _fraction(value: float) -> float:
    """Library value -> float; their -1 ("nothing to score") becomes NaN."""
    value = float(value)
    return math.nan if value < 0 else value


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _load_gt(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    data = read_json(gt, "ground truth file", GroundTruthError) if isinstance(gt, str | Path) else gt
    if not isinstance(data, Mapping):
        raise GroundTruthError(f"ground truth must be a COCO/LVIS annotation dict, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise GroundTruthError(
            f"ground truth lacks {missing}; expected a COCO/LVIS annotation file with "
            "'images', 'annotations' and 'categories'"
        )
    return dict(data)


def _infer_kind(gt: Mapping[str, Any]) -> str:
    cats = gt["categories"]
    return "lvis" if cats and all("frequency" in c for c in cats) else "coco"


def _validate_gt(gt: Mapping[str, Any], iou_type: str, kind: str) -> None:
    if not gt["images"]:
        raise GroundTruthError("ground truth has no images")
    if kind == "lvis":
        bad_cats = [c.get("id") for c in gt["categories"] if c.get("frequency") not in ("r", "c", "f")]
        if bad_cats or not gt["categories"]:
            raise GroundTruthError(
                f"LVIS evaluation needs 'frequency' in ('r', 'c', 'f') on every category; "
                f"{len(bad_cats)} lack it (ids {_head(bad_cats)}). Pass kind='coco' for "
                "COCO-style data."
            )
        fields = ("neg_category_ids", "not_exhaustive_category_ids")
        bad_imgs = [i.get("id") for i in gt["images"] if any(f not in i for f in fields)]
        if bad_imgs:
            raise GroundTruthError(
                f"LVIS evaluation needs {list(fields)} on every image (empty lists are fine); "
                f"{len(bad_imgs)} images lack them (ids {_head(bad_imgs)})"
            )
    needed = ["id", "image_id", "category_id", "bbox", "area"]
    if kind == "coco":
        needed.append("iscrowd")  # COCOeval reads it to ignore crowd regions
    if iou_type == "segm":
        needed.append("segmentation")
    for key in needed:
        bad = [a.get("id") for a in gt["annotations"] if key not in a]
        if bad:
            raise GroundTruthError(
                f"{len(bad)} ground-truth annotations lack '{key}' (ids {_head(bad)}); "
                f"{kind} {iou_type} evaluation needs {needed}"
            )


def _load_results(results: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(results, str | Path):
        data = read_json(results, "results file", ResultsError)
    else:
        data = results
    if isinstance(data, Mapping):
        raise ResultsError(
            "results must be a JSON list of detections [{'image_id', 'category_id', 'bbox', "
            f"'score'}}, ...], got a dict with keys {_head(list(data))}"
        )
    data = list(data)
    if not data:
        raise ResultsError(
            "results are empty: there is no detection to evaluate (the LVIS and COCO evaluators "
            "cannot score an empty list). Check that inference ran on these images and wrote "
            "its detections."
        )
    return data


@dataclass
class _Problems:
    """What is wrong with a results list, by kind: indices of the offending entries (ids with
    counts for unknown images and categories)."""

    not_dicts: list[int] = field(default_factory=list)
    missing: dict[str, list[int]] = field(default_factory=dict)
    unknown_imgs: dict[Any, int] = field(default_factory=dict)
    unknown_cats: dict[Any, int] = field(default_factory=dict)
    bad_scores: list[int] = field(default_factory=list)
    bad_boxes: list[int] = field(default_factory=list)
    bad_masks: list[int] = field(default_factory=list)


def _find_problems(results: list[Mapping[str, Any]], gt: Mapping[str, Any], required: tuple[str, ...]) -> _Problems:
    """Every detection checked once; each problem recorded under its kind."""
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    found = _Problems()
    for i, det in enumerate(results):
        if not isinstance(det, Mapping):
            found.not_dicts.append(i)
            continue
        absent = [k for k in required if k not in det]
        for key in absent:
            found.missing.setdefault(key, []).append(i)
        if absent:
            continue
        if det["image_id"] not in img_ids:
            found.unknown_imgs[det["image_id"]] = found.unknown_imgs.get(det["image_id"], 0) + 1
        if det["category_id"] not in cat_ids:
            found.unknown_cats[det["category_id"]] = found.unknown_cats.get(det["category_id"], 0) + 1
        if not _is_finite_number(det["score"]):
            found.bad_scores.append(i)
        if "bbox" in det and not _is_valid_box(det["bbox"]):
            found.bad_boxes.append(i)
        if "segmentation" in det and not _is_rle(det["segmentation"]):
            found.bad_masks.append(i)
    return found


def _validate_results(results: list[Mapping[str, Any]], gt: Mapping[str, Any], iou_type: str) -> None:
    """Check every detection; report each kind of problem once, with counts and examples."""
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    found = _find_problems(results, gt, required)
    n = len(results)
    with_box = sum(1 for det in results if isinstance(det, Mapping) and "bbox" in det)
    if iou_type == "segm" and 0 < with_box < n:
        # Both libraries look at the first result only to decide how to read all of them.
        raise ResultsError(
            f"{with_box} of {n} mask results carry a 'bbox' and the others do not; give it to all of them or to none"
        )
    if found.not_dicts:
        raise ResultsError(f"{len(found.not_dicts)} of {n} results are not dicts (indices {_head(found.not_dicts)})")
    if found.missing:
        parts = [f"{len(idx)} lack '{key}' (indices {_head(idx)})" for key, idx in found.missing.items()]
        hint = (
            " ('segm' evaluation needs each detection's mask as compressed RLE in 'segmentation')"
            if "segmentation" in found.missing
            else ""
        )
        raise ResultsError(f"results must carry {list(required)}; of {n} results " + ", ".join(parts) + hint)
    _report_unknown_ids(found, n)
    _report_bad_values(found, results)


def _report_unknown_ids(found: _Problems, n: int) -> None:
    """ResultsError for results whose image or category id the ground truth does not have."""
    if found.unknown_imgs:
        raise ResultsError(
            f"{sum(found.unknown_imgs.values())} of {n} results refer to {len(found.unknown_imgs)} image ids "
            f"absent from the ground truth: {_head(sorted(found.unknown_imgs, key=str))}. Evaluate "
            "against the annotation file the detections were made for."
        )
    if found.unknown_cats:
        raise ResultsError(
            f"{sum(found.unknown_cats.values())} of {n} results refer to {len(found.unknown_cats)} category "
            f"ids absent from the ground truth: {_head(sorted(found.unknown_cats, key=str))}. "
            "'category_id' must be the dataset's category id, not a contiguous class index "
            "(detections_to_results maps one to the other)."
        )


def _report_bad_values(found: _Problems, results: list[Mapping[str, Any]]) -> None:
    """ResultsError for scores, boxes or masks that are not what the evaluators read."""
    n = len(results)
    if found.bad_scores:
        raise ResultsError(
            f"{len(found.bad_scores)} of {n} results have a 'score' that is not a finite number "
            f"(indices {_head(found.bad_scores)})"
        )
    if found.bad_boxes:
        first = results[found.bad_boxes[0]]["bbox"]
        raise ResultsError(
            f"{len(found.bad_boxes)} of {n} results have an invalid 'bbox' (indices "
            f"{_head(found.bad_boxes)}; first: {first!r}). A bbox is [x, y, width, height] of finite "
            "numbers with width > 0 and height > 0; convert [x1, y1, x2, y2] boxes and drop "
            "empty ones."
        )
    if found.bad_masks:
        raise ResultsError(
            f"{len(found.bad_masks)} of {n} results have a 'segmentation' that is not a compressed RLE "
            f"dict {{'size': [h, w], 'counts': str}} (indices {_head(found.bad_masks)}); encode masks "
            "with pycocotools.mask.encode"
        )


def _result_columns(results: list[Mapping[str, Any]], gt: Mapping[str, Any], iou_type: str) -> np.ndarray | None:
    """The fast check: every detection at once, in NumPy; the detections as columns when all is well.

    Returns:
        float64 [N, 7] rows ``(image_id, x, y, w, h, score, category_id)`` (hotcoco's array
        input; ids are exact in float64 up to 2**53; x, y, w, h are NaN for mask results
        without boxes) when every detection is a dict with integer ids known to the GT, a
        finite number as score, a valid box (mask results: on all or none) and for "segm" an
        RLE dict; None when any of that fails, or the input is valid but unusual (float ids,
        numpy scalars): :func:`_validate_results` then checks entry by entry and says what is
        wrong. Being vectorized, it is much faster than that check on LVIS val's millions of
        detections (docs/benchmarks.md).
    """
    n = len(results)
    try:
        has_box = iou_type == "bbox" or "bbox" in results[0]
        image_ids = np.array([d["image_id"] for d in results])
        cat_ids = np.array([d["category_id"] for d in results])
        scores = np.array([d["score"] for d in results])
        # a missing box raises KeyError here, a ragged one ValueError
        boxes = np.array([d["bbox"] for d in results]) if has_box else np.full((n, 4), np.nan)
        if iou_type == "segm":
            if not has_box and any("bbox" in d for d in results):
                return None
            if not all(
                isinstance(d["segmentation"], dict) and "size" in d["segmentation"] and "counts" in d["segmentation"]
                for d in results
            ):
                return None
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    gt_images = np.array([img["id"] for img in gt["images"]])
    gt_cats = np.array([cat["id"] for cat in gt["categories"]])
    arrays = (image_ids, cat_ids, gt_images, gt_cats)
    if not all(a.dtype.kind in "iu" and a.ndim == 1 for a in arrays):
        return None
    if scores.dtype.kind not in "fiu" or scores.ndim != 1:
        return None
    if boxes.dtype.kind not in "fiu" or boxes.shape != (n, 4):
        return None
    good = (
        np.isin(image_ids, gt_images).all()
        and np.isin(cat_ids, gt_cats).all()
        and np.isfinite(scores).all()
        and (not has_box or (np.isfinite(boxes).all() and (boxes[:, 2:] > 0).all()))
    )
    if not good:
        return None
    columns = np.empty((n, 7), dtype=np.float64)
    columns[:, 0], columns[:, 1:5], columns[:, 5], columns[:, 6] = image_ids, boxes, scores, cat_ids
    return columns


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and math.isfinite(float(value))


def _is_valid_box(box: Any) -> bool:
    if not isinstance(box, Sequence | np.ndarray) or len(box) != 4:
        return False
    if not all(_is_finite_number(v) for v in box):
        return False
    return float(box[2]) > 0 and float(box[3]) > 0


def _is_rle(segm: Any) -> bool:
    return isinstance(segm, Mapping) and "size" in segm and "counts" in segm


def _head(items: Sequence[Any]) -> str:
    """The first few items of a list, for error messages."""
    shown = ", ".join(repr(x) for x in items[:_SHOW])
    return f"[{shown}{', ...' if len(items) > _SHOW else ''}]"
