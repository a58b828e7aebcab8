"""What the evaluators are given, checked before they run.

The ground truth is read by the one reader (:func:`regionspot_pl.data.annotations.read_ground_truth`)
and held to what the LVIS API or COCOeval needs (:func:`check_evaluable`). The detections pass a
vectorized check (:func:`result_columns`); only when it fails does the entry-by-entry check run,
to say what is wrong (:func:`validate_results`).
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.annotations import AnnotationError, GroundTruth, read_ground_truth
from ..errors import RegionSpotError
from ..utils.io import read_json

# How many offending ids / entries an error message lists before it says "...".
_SHOW = 10


class EvaluationInputError(RegionSpotError, ValueError):
    """Ground truth or results that the evaluators cannot score (base class)."""


class GroundTruthError(EvaluationInputError, AnnotationError):
    """The ground-truth annotations are missing, unreadable or lack fields the evaluator needs."""


class ResultsError(EvaluationInputError):
    """The detections are empty, malformed, or refer to images / categories absent from the GT."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (nested uses are fine): the
    libraries and json.load of LVIS-sized inputs allocate millions of small objects, and each
    burst makes the collector rescan everything alive (reference counting still frees memory)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_ground_truth(gt: str | Path | Mapping[str, Any] | GroundTruth) -> GroundTruth:
    """The checked ground truth of a COCO/LVIS JSON file or dict (a GroundTruth is returned as it is).

    Raises GroundTruthError (an AnnotationError) naming the file, the record and the fix.
    """
    if isinstance(gt, GroundTruth):
        return gt
    with gc_paused():
        try:
            return read_ground_truth(gt if isinstance(gt, str | Path) else dict(gt), what="ground truth file")
        except AnnotationError as err:  # the same message, as the evaluators' error class
            raise GroundTruthError(str(err)) from None


def check_evaluable(gt: GroundTruth, iou_type: str, kind: str) -> None:
    """What the evaluator of ``kind`` needs beyond a well-formed file: LVIS's category
    frequencies and per-image negative / not-exhaustive lists, and the annotation keys it reads."""
    if kind == "lvis":
        bad_cats = [c.get("id") for c in gt.data["categories"] if c.get("frequency") not in ("r", "c", "f")]
        if bad_cats:
            raise GroundTruthError(
                f"{gt.path}: LVIS evaluation needs 'frequency' in ('r', 'c', 'f') on every category; "
                f"{len(bad_cats)} lack it (ids {_head(bad_cats)}). Pass kind='coco' for COCO-style data."
            )
        fields = ("neg_category_ids", "not_exhaustive_category_ids")
        bad_imgs = [i for i, im in gt.images.items() if any(f not in im for f in fields)]
        if bad_imgs:
            raise GroundTruthError(
                f"{gt.path}: LVIS evaluation needs {list(fields)} on every image (empty lists are fine); "
                f"{len(bad_imgs)} images lack them (ids {_head(bad_imgs)})"
            )
    # COCOeval reads 'iscrowd' to ignore crowd regions; mask AP needs the masks
    extra = (["iscrowd"] if kind == "coco" else []) + (["segmentation"] if iou_type == "segm" else [])
    needed = ["id", "image_id", "category_id", "bbox", "area", *extra]
    for key in ("id", "area", *extra):  # the reader checked image_id, category_id and bbox
        bad = [a.get("id") for a in gt.annotations if key not in a]
        if bad:
            raise GroundTruthError(
                f"{gt.path}: {len(bad)} ground-truth annotations lack '{key}' (ids {_head(bad)}); "
                f"{kind} {iou_type} evaluation needs {needed}"
            )


def load_results(results: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The detections of a results JSON file (or of a list), as a non-empty list.

    Raises ResultsError naming the file and what is wrong with it.
    """
    with gc_paused():  # json.load of LVIS-sized results is faster without collections (docs/benchmarks.md)
        return _load_results(results)


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


def _find_problems(results: list[Mapping[str, Any]], gt: GroundTruth, required: tuple[str, ...]) -> _Problems:
    """Every detection checked once; each problem recorded under its kind."""
    img_ids = gt.images.keys()
    cat_ids = set(gt.vocab.category_ids)
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


def validate_results(results: list[Mapping[str, Any]], gt: GroundTruth, iou_type: str) -> None:
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


def result_columns(results: list[Mapping[str, Any]], gt: GroundTruth, iou_type: str) -> np.ndarray | None:
    """The fast check: every detection at once, in NumPy; the detections as columns when all is well.

    Returns:
        float64 [N, 7] rows ``(image_id, x, y, w, h, score, category_id)`` (hotcoco's array
        input; ids are exact in float64 up to 2**53; x, y, w, h are NaN for mask results
        without boxes) when every detection is a dict with integer ids known to the GT, a
        finite number as score, a valid box (mask results: on all or none) and for "segm" an
        RLE dict; None when any of that fails, or the input is valid but unusual (float ids,
        numpy scalars): :func:`validate_results` then checks entry by entry and says what is
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
    gt_images = np.fromiter(gt.images, dtype=np.int64, count=len(gt.images))
    gt_cats = np.array(gt.vocab.category_ids, dtype=np.int64)
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
