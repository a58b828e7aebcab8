"""Dataset readers: COCO-format JSON (Objects365, V3Det, LVIS, COCO, custom) and proposals files.

Everything becomes a list of :class:`ImageRecord` plus a :class:`Vocabulary` that maps the
dataset's category ids to a contiguous class index (the order of the annotation file).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..errors import RegionSpotError
from ..utils import io


class AnnotationError(RegionSpotError, ValueError):
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
        return {
            "names": list(self.names),
            "category_ids": list(self.category_ids),
            "frequencies": list(self.frequencies),
        }

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


def read_json(path: str | Path, what: str) -> dict | list:
    return io.read_json(path, what, AnnotationError)


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: object, count: int, what: str) -> list[float]:
    """``count`` numbers (inf/NaN allowed here: the box cleaner counts and drops them)."""
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise ValueError(f"{what} must be a list of {count} numbers, got {str(value)[:80]}")
    if len(value) != count:
        raise ValueError(f"{what} has {len(value)} numbers, not {count}")
    return [float(v) for v in value]


def image_file_name(image: dict) -> str:
    """Path of an image relative to the images folder.

    LVIS v1 has no ``file_name``; its images are COCO 2017's, named by ``coco_url``
    (``.../val2017/000000397133.jpg`` -> ``val2017/000000397133.jpg``).
    """
    if image.get("file_name") is not None:
        name = image["file_name"]
    elif isinstance(image.get("coco_url"), str):
        name = "/".join(image["coco_url"].split("/")[-2:])
    else:
        raise AnnotationError(f"image {image.get('id')} has neither 'file_name' nor 'coco_url'")
    if not isinstance(name, str) or not name or "\0" in name:
        raise AnnotationError(f"image {image.get('id')} has file_name {name!r}, not a non-empty path string")
    return name


def inside_folder(file_name: str) -> bool:
    """Whether a relative image path stays inside its folder (no absolute path, no ``..``).

    Lexical, so it costs nothing per image; a symlink pointing out is refused when the image is
    read (``backbones.image.resolve_image_path``).
    """
    path = PurePosixPath(file_name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and not PureWindowsPath(file_name).drive


def _record_error(path: str | Path, where: str, record: object, problem: str, fix: str) -> AnnotationError:
    return AnnotationError(f"{path}: {where} ({str(record)[:120]}) {problem}; {fix}")


def read_categories(data: dict, path: str | Path) -> Vocabulary:
    """The vocabulary: categories in id order; ids unique ints, names non-empty strings."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise AnnotationError(
            f"{path} has no categories (a vocabulary of 0 classes names nothing): "
            'add a \'categories\' list of {"id": int, "name": str}'
        )
    seen: dict[int, int] = {}
    for i, c in enumerate(cats):
        if (
            not isinstance(c, dict)
            or not _is_int(c.get("id"))
            or not isinstance(c.get("name"), str)
            or not c["name"].strip()
        ):
            raise _record_error(
                path, f"category #{i}", c, 'is not {"id": int, "name": non-empty str}', "fix the category record"
            )
        if c["id"] in seen:
            raise _record_error(
                path, f"category #{i}", c, f"repeats the id of category #{seen[c['id']]}", "category ids must be unique"
            )
        seen[c["id"]] = i
    cats = sorted(cats, key=lambda c: c["id"])
    return Vocabulary(
        names=tuple(c["name"] for c in cats),
        category_ids=tuple(c["id"] for c in cats),
        frequencies=tuple(c["frequency"] for c in cats) if all("frequency" in c for c in cats) else (),
    )


def read_images(data: dict, path: str | Path) -> dict[int, dict]:
    """Image records by id: unique int ids, positive integer sizes, a file name."""
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise AnnotationError(
            f'{path} lists no images: add an \'images\' list of {{"id", "file_name", "width", "height"}}'
        )
    by_id: dict[int, dict] = {}
    where: dict[int, int] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            raise _record_error(path, f"image #{i}", im, "is not an object", "fix the image record")
        missing = [k for k in ("id", "width", "height") if k not in im]
        if missing:
            raise _record_error(
                path,
                f"image #{i}",
                im,
                f"lacks {', '.join(map(repr, missing))}",
                "every image needs an int 'id', 'width', 'height' and a 'file_name'",
            )
        sizes_ok = all(_is_number(im[k]) and im[k] >= 1 and float(im[k]).is_integer() for k in ("width", "height"))
        if not _is_int(im["id"]) or not sizes_ok:
            raise _record_error(
                path,
                f"image #{i}",
                im,
                "needs an int 'id' and positive integer 'width'/'height'",
                "fix the image record",
            )
        try:
            image_file_name(im)
        except AnnotationError as err:
            raise _record_error(path, f"image #{i}", im, str(err), "give each image a relative 'file_name'") from None
        if im["id"] in by_id:
            first = by_id[im["id"]]
            raise _record_error(
                path,
                f"image #{i}",
                im,
                f"repeats the id {im['id']} of image #{where[im['id']]} ({image_file_name(first)!r})",
                "image ids must be unique: one image's boxes would otherwise be stored under another image's file",
            )
        by_id[im["id"]], where[im["id"]] = im, i
    return by_id


def _check_annotation(ann: object, i: int, path: str | Path) -> dict:
    """One GT annotation: int image_id and category_id, a bbox of 4 numbers."""
    fix = "every annotation needs an int 'image_id', an int 'category_id' and 'bbox': [x, y, w, h]"
    if not isinstance(ann, dict):
        raise _record_error(path, f"annotation #{i}", ann, "is not an object", fix)
    missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
    if missing:
        raise _record_error(
            path, f"annotation #{i} (id {ann.get('id')})", ann, f"lacks {', '.join(map(repr, missing))}", fix
        )
    if not _is_int(ann["image_id"]) or not _is_int(ann["category_id"]):
        raise _record_error(
            path, f"annotation #{i} (id {ann.get('id')})", ann, "has a non-integer image_id or category_id", fix
        )
    try:
        _numbers(ann["bbox"], 4, "bbox [x, y, w, h]")
    except ValueError as err:
        raise _record_error(path, f"annotation #{i} (id {ann.get('id')})", ann, str(err), fix) from None
    return ann


def _read_coco_results(data: list, path: str | Path) -> dict[int, list]:
    """COCO results list ``[{image_id, bbox: [x, y, w, h], score}, ...]`` -> per image
    ``[(xyxy, -1, score), ...]``."""
    per_image: dict[int, list] = defaultdict(list)
    for i, p in enumerate(data):
        try:
            if not isinstance(p, dict) or "image_id" not in p or "bbox" not in p:
                raise KeyError("needs 'image_id' and 'bbox'")
            if not _is_int(p["image_id"]):
                raise TypeError(f"image_id {p['image_id']!r} is not an integer")
            box = _numbers(p["bbox"], 4, "bbox [x, y, w, h]")
            score = p.get("score", 1.0)
            if not _is_number(score):
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
                box = _numbers(box, 4, f"box {str(box)[:60]}")
                if not _is_number(score):
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
    data = read_json(path, "proposals file")
    if isinstance(data, list):
        return _read_coco_results(data, path)
    if isinstance(data, dict):
        return _read_glip_results(data, path)
    raise AnnotationError(
        f"{path}: expected a COCO results list [{{image_id, bbox, score}}, ...] or a GLIP file "
        f'{{"<image_id>": {{"boxes": ..., "scores": ...}}}}, got {type(data).__name__}'
    )


def _read_ground_truth(data: dict, annotations: str | Path, index: dict[int, int], stats: ReadStats) -> dict[int, list]:
    """GT annotations -> per image ``[(xyxy, class index, 1.0), ...]``; crowd boxes skipped.
    Every record is checked; annotation ids, where given, must be unique."""
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise AnnotationError(
            f"{annotations} has no 'annotations' list: there are no boxes to extract. Add the ground truth, "
            "or pass --boxes FILE to extract proposals for these images"
        )
    per_image: dict[int, list] = defaultdict(list)
    ids: dict[int, int] = {}
    for i, ann in enumerate(anns):
        ann = _check_annotation(ann, i, annotations)
        if _is_int(ann.get("id")):
            if ann["id"] in ids:
                raise _record_error(
                    annotations,
                    f"annotation #{i}",
                    ann,
                    f"repeats the id of annotation #{ids[ann['id']]}",
                    "annotation ids must be unique (the evaluators index boxes by id)",
                )
            ids[ann["id"]] = i
        if ann.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        cat = ann["category_id"]
        if cat not in index:
            raise AnnotationError(
                f"{annotations}: annotation {ann.get('id')} has category_id {cat} not in 'categories'"
            )
        per_image[ann["image_id"]].append((xywh_to_xyxy([float(v) for v in ann["bbox"]]), index[cat], 1.0))
    return per_image


def load_coco(
    annotations: str | Path, proposals: str | Path | None = None, min_box_size: float = 1.0
) -> tuple[list[ImageRecord], Vocabulary, ReadStats]:
    """Read a COCO-format annotation file (categories, images, annotations), checking every record.

    With ``proposals`` (see :func:`read_proposals`), those boxes replace the ground truth:
    labels are -1 and scores are the proposal scores. Without, an image that has no GT box is
    prompted with one whole-image box (label -1), as the reference does, so its detections
    still count against the classes the image is negative for; such a box is not a usable
    training box.

    Malformed records (missing keys, wrong types, duplicate ids, a bbox of other than 4
    numbers) raise :class:`AnnotationError` naming the file and the record. Boxes with inf/NaN,
    degenerate or crowd boxes, boxes of unknown images and images whose file name leads
    outside the image folder are dropped and counted in the returned :class:`ReadStats`. No
    usable image, box or class at all is an error.
    """
    data = read_json(annotations, "annotation file")
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        raise AnnotationError(
            f"{annotations} is not a COCO-format annotation file: expected keys 'images', "
            "'categories' and 'annotations'"
        )
    vocab = read_categories(data, annotations)
    images = read_images(data, annotations)
    stats = ReadStats(images=len(images))
    if proposals is None:
        per_image = _read_ground_truth(data, annotations, vocab.index_of(), stats)
    else:
        per_image = read_proposals(proposals)
    records = []
    for image_id, im in sorted(images.items()):
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
    return records, vocab, stats


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


def check_ground_truth(
    path: str | Path, category_ids: tuple[int, ...], image_ids: set[int] | None, shards: str
) -> None:
    """A GT file must describe a shard folder: the same categories, and every image the shards hold.

    Args:
        path: the COCO/LVIS annotation file.
        category_ids: the dataset category ids of the shards' vocabulary.
        image_ids: the image ids the shards hold, or None when they cannot be listed cheaply.
        shards: the shard folder, for messages.
    """
    data = read_json(path, "ground-truth file")
    if not isinstance(data, dict) or not {"images", "categories", "annotations"} <= data.keys():
        raise AnnotationError(
            f"{path} is not a COCO/LVIS ground-truth file (keys 'images', 'categories', "
            f"'annotations'): pass the annotation file {shards} was extracted from"
        )
    vocab = read_categories(data, path)
    if sorted(vocab.category_ids) != sorted(category_ids):
        raise AnnotationError(
            f"{path} has {len(vocab)} categories but the shards {shards} were extracted with a vocabulary of "
            f"{len(category_ids)} (other category ids): pass the annotation file they came from"
        )
    images = read_images(data, path)
    missing = sorted(image_ids - images.keys()) if image_ids is not None else []
    if missing:
        raise AnnotationError(
            f"{len(missing)} of the {len(image_ids)} images of the shards {shards} are not in {path} (image ids "
            f"{missing[:5]}{', ...' if len(missing) > 5 else ''}): it is the ground truth of another split; pass "
            "the annotation file the shards were extracted from"
        )
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(ann, i, path)
