"""Box and mask AP of detections in COCO/LVIS results format, through the official libraries.

RegionSpot is scored on LVIS v1 val with the LVIS API (``lvis`` package): AP over IoU 0.50:0.95,
at most 300 detections per image, and the AP of the rare / common / frequent category splits.
COCO-style data (no ``frequency`` on the categories) goes through pycocotools' ``COCOeval``.
This module adds what the libraries lack: input validation with errors that say what to fix,
in-memory ground truth, quiet runs, and a NumPy >= 1.24 workaround for ``lvis`` 0.5.3.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Keys of the dict returned by evaluate_detections, in table order.
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS: tuple[str, ...] = COCO_METRICS + ("APr", "APc", "APf")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
KINDS: tuple[str, ...] = ("auto", "lvis", "coco")

# How many offending ids / entries an error message lists before it says "...".
_SHOW = 10


class EvaluationInputError(ValueError):
    """Ground truth or results that the evaluators cannot score (base class)."""


class GroundTruthError(EvaluationInputError):
    """The ground-truth annotations are missing, unreadable or lack fields the evaluator needs."""


class ResultsError(EvaluationInputError):
    """The detections are empty, malformed, or refer to images / categories absent from the GT."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def evaluate_detections(
    gt: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    iou_type: str = "bbox",
    kind: str = "auto",
    max_dets: int = 300,
    verbose: bool = False,
) -> dict[str, float]:
    """Score detections against ground truth with the LVIS API or pycocotools.

    Args:
        gt: COCO/LVIS annotation JSON (path or the loaded dict). Not modified.
        results: detections, a JSON list (path or list) of ``{"image_id", "category_id",
            "bbox": [x, y, w, h], "score"}``, plus ``"segmentation"`` (compressed RLE) for
            ``iou_type="segm"``. Not modified.
        iou_type: "bbox" (box AP) or "segm" (mask AP).
        kind: "lvis" (federated LVIS evaluation), "coco" (pycocotools COCOeval) or "auto":
            "lvis" when every GT category carries a ``frequency`` field, else "coco".
        max_dets: detection cap. LVIS keeps the ``max_dets`` best-scored detections of each
            image (official value 300). COCO applies it per image *and category*, as
            ``COCOeval.params.maxDets[-1]``; the official COCO value is 100.
        verbose: let the libraries print their progress and their own summary to stdout.

    Returns:
        Fractions in [0, 1]. LVIS: AP, AP50, AP75, APs, APm, APl, APr, APc, APf.
        COCO: the first six only (APr/APc/APf are absent: COCO has no frequency splits).
        A metric with no ground truth to score (e.g. no small objects, no rare category
        present) is NaN, where the libraries return -1.

    Raises:
        GroundTruthError, ResultsError (both ValueError): input the evaluators cannot score.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")

    gt_dict = _load_gt(gt)
    if kind == "auto":
        kind = _infer_kind(gt_dict)
    _validate_gt(gt_dict, iou_type, kind)
    dets = _load_results(results)
    _validate_results(dets, gt_dict, iou_type)

    # Both libraries write into the annotation and result dicts they are given ("ignore", "id",
    # "area", a rasterized "segmentation"): copy each dict so the caller's data stays intact.
    # A shallow copy per dict suffices, they only assign keys; a deepcopy of LVIS val is slow.
    gt_dict = {**gt_dict, "annotations": [dict(a) for a in gt_dict["annotations"]]}
    dets = [dict(d) for d in dets]

    with _quiet(not verbose):
        if kind == "lvis":
            return _run_lvis(gt_dict, dets, iou_type, max_dets, verbose)
        return _run_coco(gt_dict, dets, iou_type, max_dets)


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
# Running the libraries
# --------------------------------------------------------------------------------------------


def _run_lvis(
    gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int, verbose: bool
) -> dict[str, float]:
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
    with _numpy_float_alias():
        evaluator.accumulate()
    evaluator.summarize()
    if verbose:
        evaluator.print_results()
    results = evaluator.get_results()
    return {key: _fraction(results[key]) for key in LVIS_METRICS}


def _run_coco(
    gt: dict[str, Any], dets: list[dict[str, Any]], iou_type: str, max_dets: int
) -> dict[str, float]:
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
    stats = [float(v) for v in evaluator.stats[: len(COCO_METRICS)]]
    if max_dets != 100:
        # summarize() computes stats[0] (AP) at a hard-coded maxDets=100 (its _summarize
        # default) and finds -1 when 100 is not in params.maxDets; stats[1:6] do use
        # maxDets[-1]. Redo stats[0] the way _summarize does: mean precision over IoUs,
        # recall thresholds and categories, area "all", the last maxDets, ignoring -1 entries.
        precision = evaluator.eval["precision"][:, :, :, evaluator.params.areaRngLbl.index("all"), -1]
        valid = precision[precision > -1]
        stats[0] = float(valid.mean()) if valid.size else -1.0
    return {key: _fraction(stats[i]) for i, key in enumerate(COCO_METRICS)}


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
    """Silence the libraries: pycocotools prints to stdout, lvis logs (and warns) via logging."""
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


def _read_json(path: str | Path, what: str, error: type[EvaluationInputError]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        with path.open() as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise error(f"{what} file {path} is not valid JSON: {err}") from None


def _load_gt(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    data = _read_json(gt, "ground truth", GroundTruthError) if isinstance(gt, str | Path) else gt
    if not isinstance(data, Mapping):
        raise GroundTruthError(
            f"ground truth must be a COCO/LVIS annotation dict, got {type(data).__name__}"
        )
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
        data = _read_json(results, "results", ResultsError)
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


def _validate_results(
    results: list[Mapping[str, Any]], gt: Mapping[str, Any], iou_type: str
) -> None:
    """Check every detection; report each kind of problem once, with counts and examples."""
    required = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}

    not_dicts: list[int] = []
    missing: dict[str, list[int]] = {}
    unknown_imgs: dict[Any, int] = {}
    unknown_cats: dict[Any, int] = {}
    bad_scores: list[int] = []
    bad_boxes: list[int] = []
    bad_masks: list[int] = []
    for i, det in enumerate(results):
        if not isinstance(det, Mapping):
            not_dicts.append(i)
            continue
        absent = [k for k in required if k not in det]
        for key in absent:
            missing.setdefault(key, []).append(i)
        if absent:
            continue
        if det["image_id"] not in img_ids:
            unknown_imgs[det["image_id"]] = unknown_imgs.get(det["image_id"], 0) + 1
        if det["category_id"] not in cat_ids:
            unknown_cats[det["category_id"]] = unknown_cats.get(det["category_id"], 0) + 1
        if not _is_finite_number(det["score"]):
            bad_scores.append(i)
        if "bbox" in det and not _is_valid_box(det["bbox"]):
            bad_boxes.append(i)
        if "segmentation" in det and not _is_rle(det["segmentation"]):
            bad_masks.append(i)

    n = len(results)
    with_box = sum(1 for det in results if isinstance(det, Mapping) and "bbox" in det)
    if iou_type == "segm" and 0 < with_box < n:
        # Both libraries look at the first result only to decide how to read all of them.
        raise ResultsError(
            f"{with_box} of {n} mask results carry a 'bbox' and the others do not; give it to "
            "all of them or to none"
        )
    if not_dicts:
        raise ResultsError(
            f"{len(not_dicts)} of {n} results are not dicts (indices {_head(not_dicts)})"
        )
    if missing:
        parts = [f"{len(idx)} lack '{key}' (indices {_head(idx)})" for key, idx in missing.items()]
        hint = (
            " ('segm' evaluation needs each detection's mask as compressed RLE in 'segmentation')"
            if "segmentation" in missing
            else ""
        )
        raise ResultsError(
            f"results must carry {list(required)}; of {n} results " + ", ".join(parts) + hint
        )
    if unknown_imgs:
        raise ResultsError(
            f"{sum(unknown_imgs.values())} of {n} results refer to {len(unknown_imgs)} image ids "
            f"absent from the ground truth: {_head(sorted(unknown_imgs, key=str))}. Evaluate "
            "against the annotation file the detections were made for."
        )
    if unknown_cats:
        raise ResultsError(
            f"{sum(unknown_cats.values())} of {n} results refer to {len(unknown_cats)} category "
            f"ids absent from the ground truth: {_head(sorted(unknown_cats, key=str))}. "
            "'category_id' must be the dataset's category id, not a contiguous class index "
            "(detections_to_results maps one to the other)."
        )
    if bad_scores:
        raise ResultsError(
            f"{len(bad_scores)} of {n} results have a 'score' that is not a finite number "
            f"(indices {_head(bad_scores)})"
        )
    if bad_boxes:
        first = results[bad_boxes[0]]["bbox"]
        raise ResultsError(
            f"{len(bad_boxes)} of {n} results have an invalid 'bbox' (indices "
            f"{_head(bad_boxes)}; first: {first!r}). A bbox is [x, y, width, height] of finite "
            "numbers with width > 0 and height > 0; convert [x1, y1, x2, y2] boxes and drop "
            "empty ones."
        )
    if bad_masks:
        raise ResultsError(
            f"{len(bad_masks)} of {n} results have a 'segmentation' that is not a compressed RLE "
            f"dict {{'size': [h, w], 'counts': str}} (indices {_head(bad_masks)}); encode masks "
            "with pycocotools.mask.encode"
        )


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
