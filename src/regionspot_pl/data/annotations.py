"""Dataset readers: COCO-format JSON (Objects365, V3Det, LVIS, COCO, custom) and proposals files.

Everything becomes a list of :class:`ImageRecord` plus a :class:`Vocabulary` that maps the
dataset's category ids to a contiguous class index (the order of the annotation file).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class AnnotationError(ValueError):
    """An annotation or proposals file is missing or malformed."""


@dataclass(frozen=True)
class Vocabulary:
    """Class names in contiguous-index order, with the dataset's category id of each."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]
    frequencies: tuple[str, ...] = ()  # LVIS 'r'/'c'/'f' per class when the dataset has them

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.category_ids)}

    def to_dict(self) -> dict:
        return {"names": list(self.names), "category_ids": list(self.category_ids),
                "frequencies": list(self.frequencies)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(tuple(d["names"]), tuple(int(c) for c in d["category_ids"]), tuple(d.get("frequencies", ())))


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
    """What the reader dropped, so a run can report it."""

    images: int = 0
    boxes: int = 0
    crowd_skipped: int = 0
    degenerate_dropped: int = 0
    clipped: int = 0
    whole_image_prompts: int = 0  # GT images without a box, prompted with the whole image
    unknown_images: set = field(default_factory=set)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["unknown_images"] = len(self.unknown_images)
        return d


def read_json(path: str | Path, what: str) -> dict | list:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{what} {path} is not valid JSON: {err}") from err


def clean_boxes(xyxy: np.ndarray, width: int, height: int, min_size: float = 1.0):
    """xyxy boxes clipped to the image; returns (boxes float32, keep mask, clipped count)."""
    xyxy = xyxy.astype(np.float32)
    clipped = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    changed = int((np.abs(clipped - xyxy) > 1e-3).any(axis=1).sum())
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    keep &= np.isfinite(clipped).all(axis=1)
    return clipped, keep, changed


def xywh_to_xyxy(xywh: list[float]) -> list[float]:
    x, y, w, h = xywh
    return [x, y, x + w, y + h]


def image_file_name(image: dict) -> str:
    """Path of an image relative to the images folder.

    LVIS v1 has no ``file_name``; its images are COCO 2017's, named by ``coco_url``
    (``.../val2017/000000397133.jpg`` -> ``val2017/000000397133.jpg``).
    """
    if "file_name" in image:
        return image["file_name"]
    if "coco_url" in image:
        return "/".join(image["coco_url"].split("/")[-2:])
    raise AnnotationError(f"image {image.get('id')} has neither 'file_name' nor 'coco_url'")


def _read_coco_results(data: list, path: str | Path) -> dict[int, list]:
    """COCO results list ``[{image_id, bbox: [x, y, w, h], score}, ...]`` -> per image
    ``[(xyxy, -1, score), ...]``."""
    per_image: dict[int, list] = defaultdict(list)
    for i, p in enumerate(data):
        try:
            box = [float(v) for v in p["bbox"]]
            if len(box) != 4:
                raise ValueError(f"bbox has {len(box)} numbers, not x, y, w, h")
            per_image[int(p["image_id"])].append((xywh_to_xyxy(box), -1, float(p.get("score", 1.0))))
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
                box = [float(v) for v in box]
                if len(box) != 4:
                    raise ValueError(f"box {box} has {len(box)} numbers, not x1, y1, x2, y2")
                per_image[image_id].append((box, -1, float(score)))
        except (KeyError, TypeError, ValueError) as err:
            raise AnnotationError(
                f"{where} is not {{\"boxes\": [[x1, y1, x2, y2], ...], \"scores\": [...]}} "
                f"keyed by image id: {type(err).__name__}: {err}"
            ) from err
    return per_image


def read_proposals(path: str | Path) -> dict[int, list]:
    """Boxes from outside, per image id: ``[(xyxy, -1, score), ...]``.

    Two formats, told apart by shape: a COCO results list (``bbox`` as x, y, w, h) or the
    reference's GLIP file, a dict keyed by image id (``boxes`` as x1, y1, x2, y2).
    """
    data = read_json(path, "proposals file")
    if isinstance(data, list):
        return _read_coco_results(data, path)
    if isinstance(data, dict):
        return _read_glip_results(data, path)
    raise AnnotationError(
        f"{path}: expected a COCO results list [{{image_id, bbox, score}}, ...] or a GLIP file "
        f"{{\"<image_id>\": {{\"boxes\": ..., \"scores\": ...}}}}, got {type(data).__name__}"
    )


def _read_ground_truth(data: dict, annotations: str | Path, index: dict[int, int],
                       stats: ReadStats) -> dict[int, list]:
    """GT annotations -> per image ``[(xyxy, class index, 1.0), ...]``; crowd boxes skipped."""
    per_image: dict[int, list] = defaultdict(list)
    for ann in data.get("annotations", []):
        if ann.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        cat = int(ann["category_id"])
        if cat not in index:
            raise AnnotationError(f"{annotations}: annotation {ann.get('id')} has category_id {cat} not in 'categories'")
        per_image[int(ann["image_id"])].append((xywh_to_xyxy(ann["bbox"]), index[cat], 1.0))
    return per_image


def load_coco(
    annotations: str | Path, proposals: str | Path | None = None, min_box_size: float = 1.0
) -> tuple[list[ImageRecord], Vocabulary, ReadStats]:
    """Read a COCO-format annotation file (categories, images, annotations).

    With ``proposals`` (see :func:`read_proposals`), those boxes replace the ground truth:
    labels are -1 and scores are the proposal scores. Without, an image that has no GT box is
    prompted with one whole-image box (label -1), as the reference does, so its detections
    still count against the classes the image is negative for.
    """
    data = read_json(annotations, "annotation file")
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        raise AnnotationError(
            f"{annotations} is not a COCO-format annotation file: expected keys 'images', "
            "'categories' and 'annotations'"
        )
    cats = sorted(data["categories"], key=lambda c: c["id"])
    vocab = Vocabulary(
        names=tuple(c["name"] for c in cats),
        category_ids=tuple(int(c["id"]) for c in cats),
        frequencies=tuple(c["frequency"] for c in cats) if cats and all("frequency" in c for c in cats) else (),
    )
    images = {int(im["id"]): im for im in data["images"]}
    stats = ReadStats(images=len(images))
    if proposals is None:
        per_image = _read_ground_truth(data, annotations, vocab.index_of(), stats)
    else:
        per_image = read_proposals(proposals)

    records = []
    for image_id, im in sorted(images.items()):
        w, h = int(im["width"]), int(im["height"])
        items = per_image.pop(image_id, [])
        if not items and proposals is None:
            items = [([0.0, 0.0, float(w), float(h)], -1, 1.0)]
            stats.whole_image_prompts += 1
        if items:
            xyxy = np.asarray([b for b, _, _ in items], dtype=np.float64).reshape(-1, 4)
            boxes, keep, clipped = clean_boxes(xyxy, w, h, min_box_size)
            stats.clipped += clipped
            stats.degenerate_dropped += int((~keep).sum())
            labels = np.asarray([lab for _, lab, _ in items], dtype=np.int64)[keep]
            scores = np.asarray([s for _, _, s in items], dtype=np.float32)[keep]
            boxes = boxes[keep]
        else:
            boxes, labels, scores = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        stats.boxes += len(boxes)
        records.append(ImageRecord(image_id, image_file_name(im), w, h, boxes, labels, scores))
    stats.unknown_images = set(per_image)
    return records, vocab, stats
