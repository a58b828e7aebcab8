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


def clean_boxes(xywh: np.ndarray, width: int, height: int, min_size: float = 1.0):
    """COCO xywh -> xyxy clipped to the image; returns (boxes, keep mask, clipped count)."""
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    clipped = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    changed = int((np.abs(clipped - xyxy) > 1e-3).any(axis=1).sum())
    keep = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    keep &= np.isfinite(clipped).all(axis=1)
    return clipped, keep, changed


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


def load_coco(
    annotations: str | Path, proposals: str | Path | None = None, min_box_size: float = 1.0
) -> tuple[list[ImageRecord], Vocabulary, ReadStats]:
    """Read a COCO-format annotation file (categories, images, annotations).

    With ``proposals`` (COCO results format: image_id, bbox xywh, score), those boxes replace
    the ground truth: labels are -1 and scores are the proposal scores.
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
    index = vocab.index_of()
    images = {int(im["id"]): im for im in data["images"]}
    stats = ReadStats(images=len(images))

    per_image: dict[int, list] = defaultdict(list)
    if proposals is None:
        for ann in data.get("annotations", []):
            if ann.get("iscrowd", 0):
                stats.crowd_skipped += 1
                continue
            cat = int(ann["category_id"])
            if cat not in index:
                raise AnnotationError(f"{annotations}: annotation {ann.get('id')} has category_id {cat} not in 'categories'")
            per_image[int(ann["image_id"])].append((ann["bbox"], index[cat], 1.0))
    else:
        props = read_json(proposals, "proposals file")
        if not isinstance(props, list):
            raise AnnotationError(f"{proposals}: expected a COCO results list of {{image_id, bbox, score}}")
        for p in props:
            try:
                per_image[int(p["image_id"])].append((p["bbox"], -1, float(p.get("score", 1.0))))
            except (KeyError, TypeError) as err:
                raise AnnotationError(f"{proposals}: entry {p!r} lacks image_id/bbox ({err})") from err

    records = []
    for image_id, im in sorted(images.items()):
        w, h = int(im["width"]), int(im["height"])
        items = per_image.pop(image_id, [])
        if items:
            xywh = np.asarray([b for b, _, _ in items], dtype=np.float64).reshape(-1, 4)
            boxes, keep, clipped = clean_boxes(xywh, w, h, min_box_size)
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
