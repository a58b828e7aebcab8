"""What extraction reads: the images of an annotation file with their boxes, ground truth or
proposals, as :class:`ImageRecord` plus the :class:`~.annotations.Vocabulary` that maps the
dataset's category ids to a contiguous class index (the order of the annotation file).

The file itself is read and checked by :func:`.annotations.read_ground_truth`; this module turns it
into records, cleans the boxes (clipped to the image; degenerate, non-finite and crowd boxes
dropped and counted) and reads proposals files.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.io import read_json
from .annotations import (
    AnnotationError,
    GroundTruth,
    Vocabulary,
    image_file_name,
    inside_folder,
    is_int,
    is_number,
    numbers,
    read_ground_truth,
)


@dataclass
class ImageRecord:
    """One image and its boxes. Boxes are xyxy in original pixels, clipped to the image."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N], contiguous class index, -1 if unknown
    scores: np.ndarray  # float32 [N], 1 for ground-truth boxes


@dataclass
class ReadStats:
    """What the reader kept and dropped, by reason, so a run can report it (and the manifest keeps it)."""

    images: int = 0  # image records in the file
    boxes: int = 0  # boxes kept, whole-image prompts included
    labelled_boxes: int = 0  # kept boxes with a class: what training learns from
    crowd_skipped: int = 0
    degenerate_dropped: int = 0  # narrower or lower than the minimum box size (after clipping)
    non_finite_dropped: int = 0  # a coordinate or score that is inf or NaN
    clipped: int = 0
    whole_image_prompts: int = 0  # GT images without a box, prompted with the whole image (label -1)
    images_outside: int = 0  # images dropped: their file_name leads outside the image folder
    unknown_image_boxes: int = 0  # boxes of image ids the file does not list
    unknown_images: set = field(default_factory=set)
    outside_examples: list = field(default_factory=list)  # a few dropped file names, for the message

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "outside_examples"}
        d["unknown_images"] = len(self.unknown_images)
        return d

    def dropped(self) -> dict[str, int]:
        """Drop counts by reason (zeros left out)."""
        counts = {
            "crowd boxes": self.crowd_skipped,
            "degenerate boxes": self.degenerate_dropped,
            "non-finite boxes": self.non_finite_dropped,
            "boxes of unknown image ids": self.unknown_image_boxes,
            "images outside the image folder": self.images_outside,
        }
        return {k: v for k, v in counts.items() if v}

    def describe(self) -> str:
        """'12 images, 40 boxes (38 labelled); dropped: 2 crowd boxes, ...' for messages and logs."""
        dropped = ", ".join(f"{v} {k}" for k, v in self.dropped().items()) or "nothing"
        return (
            f"{self.images} images, {self.boxes} boxes kept ({self.labelled_boxes} with a class, "
            f"{self.whole_image_prompts} whole-image prompts); dropped: {dropped}"
        )


def clean_boxes(xyxy: np.ndarray, width: int, height: int, min_size: float = 1.0):
    """xyxy boxes clipped to the image.

    Returns (boxes float32, keep mask, clipped count, non-finite count). A box with an inf or
    NaN coordinate is dropped, never clipped: clipping would turn ``inf`` into the image edge
    and keep a made-up box as training data.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(xyxy).all(axis=1)
    xyxy = np.where(finite[:, None], xyxy, 0.0)
    clipped = np.clip(xyxy, 0, [width, height, width, height])
    changed = int(((np.abs(clipped - xyxy) > 1e-3).any(axis=1) & finite).sum())
    clipped = clipped.astype(np.float32)
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    return clipped, keep & finite, changed, int((~finite).sum())


def xywh_to_xyxy(xywh: list[float]) -> list[float]:
    x, y, w, h = xywh
    return [x, y, x + w, y + h]


def _read_coco_results(data: list, path: str | Path) -> dict[int, list]:
    """COCO results list ``[{image_id, bbox: [x, y, w, h], score}, ...]`` -> per image
    ``[(xyxy, -1, score), ...]``."""
    per_image: dict[int, list] = defaultdict(list)
    for i, p in enumerate(data):
        try:
            if not isinstance(p, dict) or "image_id" not in p or "bbox" not in p:
                raise KeyError("needs 'image_id' and 'bbox'")
            if not is_int(p["image_id"]):
                raise TypeError(f"image_id {p['image_id']!r} is not an integer")
            box = numbers(p["bbox"], 4, "bbox [x, y, w, h]")
            score = p.get("score", 1.0)
            if not is_number(score):
                raise TypeError(f"score {score!r} is not a number")
            per_image[p["image_id"]].append((xywh_to_xyxy(box), -1, float(score)))
        except (KeyError, TypeError, ValueError) as err:
            raise AnnotationError(
                f"{path}: entry {i} ({str(p)[:120]}) is not {{image_id, bbox: [x, y, w, h], score}}: {err}"
            ) from err
    return per_image


def _read_glip_results(data: dict, path: str | Path) -> dict[int, list]:
    """The reference's GLIP file ``{"<image_id>": {"boxes": [[x1, y1, x2, y2], ...] (original
    pixels), "scores": [...], "labels": [...]}}`` -> per image ``[(xyxy, -1, score), ...]``.
    GLIP's labels are not used: RegionSpot names the boxes itself."""
    per_image: dict[int, list] = defaultdict(list)
    for key, entry in data.items():
        where = f"{path}: entry {key!r}"
        try:
            image_id = int(key)
            boxes, scores = entry["boxes"], entry["scores"]
            if len(boxes) != len(scores):
                raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
            for box, score in zip(boxes, scores):
                box = numbers(box, 4, f"box {str(box)[:60]}")
                if not is_number(score):
                    raise TypeError(f"score {score!r} is not a number")
                per_image[image_id].append((box, -1, float(score)))
        except (KeyError, TypeError, ValueError) as err:
            raise AnnotationError(
                f'{where} is not {{"boxes": [[x1, y1, x2, y2], ...], "scores": [...]}} '
                f"keyed by image id: {type(err).__name__}: {err}"
            ) from err
    return per_image


def read_proposals(path: str | Path) -> dict[int, list]:
    """Boxes from outside, per image id: ``[(xyxy, -1, score), ...]``.

    Two formats, told apart by shape: a COCO results list (``bbox`` as x, y, w, h) or the
    reference's GLIP file, a dict keyed by image id (``boxes`` as x1, y1, x2, y2). Every entry
    is checked; inf/NaN values are kept here and dropped (counted) by :func:`load_coco`.
    """
    data = read_json(path, "proposals file", AnnotationError)
    if isinstance(data, list):
        return _read_coco_results(data, path)
    if isinstance(data, dict):
        return _read_glip_results(data, path)
    raise AnnotationError(
        f"{path}: expected a COCO results list [{{image_id, bbox, score}}, ...] or a GLIP file "
        f'{{"<image_id>": {{"boxes": ..., "scores": ...}}}}, got {type(data).__name__}'
    )


def _ground_truth_boxes(gt: GroundTruth, stats: ReadStats) -> dict[int, list]:
    """GT annotations (checked by the reader) -> per image ``[(xyxy, class index, 1.0), ...]``;
    crowd boxes skipped."""
    index = gt.vocab.index_of()
    per_image: dict[int, list] = defaultdict(list)
    for ann in gt.annotations:
        if ann.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        per_image[ann["image_id"]].append(
            (xywh_to_xyxy([float(v) for v in ann["bbox"]]), index[ann["category_id"]], 1.0)
        )
    return per_image


def load_coco(
    annotations: str | Path, proposals: str | Path | None = None, min_box_size: float = 1.0
) -> tuple[list[ImageRecord], Vocabulary, ReadStats]:
    """The images of a COCO-format annotation file and their boxes, for extraction.

    The file is read and every record checked by :func:`.annotations.read_ground_truth` (an
    :class:`AnnotationError` names a malformed record); every image must name its file. With
    ``proposals`` (see :func:`read_proposals`), those boxes replace the ground truth: labels are
    -1 and scores are the proposal scores. Without, an image that has no GT box is prompted with
    one whole-image box (label -1), as the reference does, so its detections still count against
    the classes the image is negative for; such a box is not a usable training box.

    Boxes with inf/NaN, degenerate or crowd boxes, boxes of unknown images and images whose file
    name leads outside the image folder are dropped and counted in the returned
    :class:`ReadStats`. No usable image, box or class at all is an error.
    """
    gt = read_ground_truth(annotations, file_names=True, annotations_required=False)
    if proposals is None and "annotations" not in gt.data:
        raise AnnotationError(
            f"{annotations} has no 'annotations' list: there are no boxes to extract. Add the ground truth, "
            "or pass --boxes FILE to extract proposals for these images"
        )
    stats = ReadStats(images=len(gt.images))
    per_image = _ground_truth_boxes(gt, stats) if proposals is None else read_proposals(proposals)
    records = []
    for image_id, im in sorted(gt.images.items()):
        items = per_image.pop(image_id, [])
        name = image_file_name(im)
        if not inside_folder(name):
            stats.images_outside += 1
            stats.outside_examples = (stats.outside_examples + [name])[:3]
            continue
        records.append(_image_record(image_id, im, name, items, proposals is None, min_box_size, stats))
    stats.unknown_images = set(per_image)
    stats.unknown_image_boxes = sum(len(v) for v in per_image.values())
    _check_usable(records, stats, annotations, proposals)
    return records, gt.vocab, stats


def _image_record(
    image_id: int, im: dict, name: str, items: list, ground_truth: bool, min_box_size: float, stats: ReadStats
) -> ImageRecord:
    """One image's record: its boxes cleaned (clipped, degenerate and non-finite dropped)."""
    w, h = int(im["width"]), int(im["height"])
    if not items and ground_truth:
        items = [([0.0, 0.0, float(w), float(h)], -1, 1.0)]
        stats.whole_image_prompts += 1
    if not items:
        return ImageRecord(
            image_id, name, w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        )
    boxes, keep, clipped, non_finite = clean_boxes(np.asarray([b for b, _, _ in items]), w, h, min_box_size)
    scores = np.asarray([s for _, _, s in items], dtype=np.float32)
    bad_score = ~np.isfinite(scores) & keep
    keep &= ~bad_score
    stats.clipped += clipped
    stats.non_finite_dropped += non_finite + int(bad_score.sum())
    stats.degenerate_dropped += int((~keep).sum()) - non_finite - int(bad_score.sum())
    labels = np.asarray([lab for _, lab, _ in items], dtype=np.int64)[keep]
    stats.boxes += int(keep.sum())
    stats.labelled_boxes += int((labels >= 0).sum())
    return ImageRecord(image_id, name, w, h, boxes[keep], labels, scores[keep])


def _check_usable(
    records: list[ImageRecord], stats: ReadStats, annotations: str | Path, proposals: str | Path | None
) -> None:
    """No usable image, or no box to learn from or to name, is an error with the counts by reason."""
    if not records:
        examples = ", ".join(repr(n) for n in stats.outside_examples)
        raise AnnotationError(
            f"{annotations}: no usable image ({stats.describe()}; e.g. {examples}): file names "
            "must be relative paths inside --images"
        )
    if proposals is not None and stats.boxes == 0:
        raise AnnotationError(
            f"{proposals}: no usable proposal box for the images of {annotations} "
            f"({stats.describe()}): check that its image ids are those of the annotation file"
        )
    if proposals is None and stats.labelled_boxes == 0:
        raise AnnotationError(
            f"{annotations}: no usable ground-truth box ({stats.describe()}): nothing to "
            "learn from or to name; fix the annotations, or pass --boxes FILE for proposals"
        )
