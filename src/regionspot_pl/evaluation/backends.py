"""The three metric backends behind :func:`.metrics.evaluate_results`, each given checked inputs.

- hotcoco: a Rust implementation of the LVIS API and of pycocotools' ``COCOeval``, fed what the
  LVIS API reads differently made explicit (:func:`_as_the_lvis_api_reads_them`);
- the LVIS API (``lvis``), with the ground truth in memory, the per-image cap of our choosing, two
  memory trims and a NumPy >= 1.24 workaround for ``lvis`` 0.5.3;
- pycocotools' ``COCOeval`` for COCO-style data, with AP at our detection cap.

Each returns (metrics, precision array, category ids of its K axis); the libraries' -1 ("nothing
to score") becomes NaN.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

# Keys of the dict of metrics, in table order.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS: tuple[str, ...] = COCO_METRICS + ("APr", "APc", "APf")
Run = tuple[dict[str, float], np.ndarray, list[int]]


def run_backend(
    backend: str,
    gt: dict[str, Any],
    dets: list[Mapping[str, Any]],
    columns: np.ndarray | None,
    scoring: tuple[str, str, int],
    verbose: bool,
    inputs_owned: bool,
) -> Run:
    """(metrics, precision, category ids) of one evaluation.

    ``scoring``: (iou_type, kind, max_dets). ``columns``: the detections as hotcoco's [N, 7]
    array, when the fast check built it (hotcoco only). ``inputs_owned``: the official libraries may write into
    ``gt`` and ``dets`` instead of into copies.
    """
    iou_type, kind, max_dets = scoring
    with quiet(not verbose):
        if backend == "hotcoco":
            return _run_hotcoco(gt, dets, columns, iou_type, kind, max_dets)
        if not inputs_owned:
            gt, dets = _copies(gt, dets)
        if iou_type == "bbox":
            _share_a_placeholder_mask(dets)
        run = _run_lvis if kind == "lvis" else _run_coco
        return run(gt, dets, iou_type, max_dets, verbose)


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
) -> Run:
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


def _run_lvis(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int, verbose: bool) -> Run:
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


def _run_coco(gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int, verbose: bool) -> Run:
    del verbose  # COCOeval prints its summary anyway; quiet decides whether it is seen
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
def quiet(enabled: bool) -> Iterator[None]:
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
