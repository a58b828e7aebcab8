"""The one reader of COCO-format annotation files (LVIS, COCO, Objects365, V3Det, custom) and the
one check of a ground truth against the shards it is used with.

Every command reads an annotation file through :func:`read_ground_truth`: extraction
(:func:`.records.load_coco`), ``test``, ``fit``'s validation and the evaluators
(:mod:`regionspot_pl.evaluation.inputs`). It checks every record once: categories (unique int
ids, names), images (unique int ids, positive integer sizes, a file name that is a path string
where one is given) and annotations (int ids of a listed category, a bbox of 4 numbers, unique
ids). A malformed record is an :class:`AnnotationError` naming the file, the record and the fix.
:func:`check_ground_truth` then holds a ground truth to a shard folder: it must name the shards'
classes and hold their images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from ..errors import RegionSpotError
from ..utils.io import read_json

# How many names / ids a message lists before it says "...".
_SHOW = 5
_NUMBER_TYPES = frozenset((int, float))
_IN_MEMORY = "the ground truth (in memory)"


class AnnotationError(RegionSpotError, ValueError):
    """An annotation, ground-truth or proposals file is missing or malformed, or does not fit the shards."""


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


@dataclass(frozen=True)
class GroundTruth:
    """A read and checked annotation file.

    ``data`` is the file's dict (a shallow copy of an in-memory one), ``vocab`` its categories in
    id order, ``images`` its image records by id, ``path`` the file (for messages).
    """

    path: str
    data: dict[str, Any]
    vocab: Vocabulary
    images: dict[int, dict]

    @property
    def annotations(self) -> list[dict]:
        """The annotation records ([] for a file without an 'annotations' list, see read_ground_truth)."""
        return self.data.get("annotations", [])

    @property
    def kind(self) -> str:
        """'lvis' when every category carries a 'frequency' (the LVIS protocol applies), else 'coco'."""
        return "lvis" if self.vocab.frequencies else "coco"


def read_ground_truth(
    source: str | Path | dict[str, Any],
    what: str = "annotation file",
    file_names: bool = False,
    annotations_required: bool = True,
) -> GroundTruth:
    """Read a COCO-format annotation file (or check an in-memory one), every record checked.

    Args:
        source: the JSON file, or its loaded dict (not modified).
        what: what the file is, for the message when it is missing or not JSON.
        file_names: every image must name its file (``file_name``, or LVIS's ``coco_url``), as
            extraction needs; otherwise only a ``file_name`` that is given is checked.
        annotations_required: a file without an 'annotations' list is an error (with False, it
            reads as having none).

    Raises:
        AnnotationError naming the file, the record and the fix.
    """
    path = str(source) if isinstance(source, str | Path) else _IN_MEMORY
    data = read_json(source, what, AnnotationError) if isinstance(source, str | Path) else source
    _check_layout(data, path, annotations_required)
    vocab = read_categories(data, path)
    images = read_images(data, path, file_names)
    if "annotations" in data:
        check_annotations(data["annotations"], path, set(vocab.category_ids))
    return GroundTruth(path, dict(data), vocab, images)


def _check_layout(data: object, path: str, annotations_required: bool) -> None:
    """An object with the lists of a COCO-format file."""
    expected = "expected an object with 'images', 'categories' and 'annotations'"
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path} is not a COCO-format annotation file (it holds a {type(data).__name__}): {expected}"
        )
    lacking = [key for key in ("images", "categories") if key not in data]
    if lacking:
        raise AnnotationError(f"{path} is not a COCO-format annotation file (it lacks {_listed(lacking)}): {expected}")
    if "annotations" not in data and annotations_required:
        raise AnnotationError(
            f"{path} has no 'annotations' list: it holds no ground truth to score or check against; "
            "pass the annotation file with its 'annotations'"
        )


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------


def is_int(value: object) -> bool:
    """An integer (NumPy's too, as an in-memory file may hold), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float (NumPy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def numbers(value: object, count: int, what: str) -> list[float]:
    """``count`` numbers (inf/NaN allowed here: the box cleaner counts and drops them); ValueError if not."""
    if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
        raise ValueError(f"{what} must be a list of {count} numbers, got {str(value)[:80]}")
    if len(value) != count:
        raise ValueError(f"{what} has {len(value)} numbers, not {count}")
    return [float(v) for v in value]


def _record_error(path: str | Path, where: str, record: object, problem: str, fix: str) -> AnnotationError:
    return AnnotationError(f"{path}: {where} ({str(record)[:120]}) {problem}; {fix}")


def _listed(items: list, show: int = _SHOW) -> str:
    return ", ".join(map(repr, items[:show])) + (", ..." if len(items) > show else "")


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
            or not is_int(c.get("id"))
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


def read_images(data: dict, path: str | Path, file_names: bool = True) -> dict[int, dict]:
    """Image records by id: unique int ids, positive integer sizes, and a file name that is a
    non-empty path string wherever ``file_name`` is given (required when ``file_names``)."""
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise AnnotationError(
            f'{path} lists no images: add an \'images\' list of {{"id", "file_name", "width", "height"}}'
        )
    by_id: dict[int, dict] = {}
    where: dict[int, int] = {}
    for i, im in enumerate(images):
        _check_image(im, i, path, file_names)
        if im["id"] in by_id:
            raise _record_error(
                path,
                f"image #{i}",
                im,
                f"repeats the id {im['id']} of image #{where[im['id']]}",
                "image ids must be unique: one image's boxes would otherwise be stored under another image's file",
            )
        by_id[im["id"]], where[im["id"]] = im, i
    return by_id


def _check_image(im: object, i: int, path: str | Path, file_names: bool) -> None:
    """One image record; AnnotationError naming it (by index and id) and the fix."""
    if not isinstance(im, dict):
        raise _record_error(path, f"image #{i}", im, "is not an object", "fix the image record")
    where = f"image #{i} (id {im.get('id')!r})"
    missing = [k for k in ("id", "width", "height") if k not in im]
    if missing:
        needs = "an int 'id', 'width', 'height'" + (" and a 'file_name'" if file_names else "")
        raise _record_error(path, where, im, f"lacks {', '.join(map(repr, missing))}", f"every image needs {needs}")
    sizes_ok = all(is_number(im[k]) and im[k] >= 1 and float(im[k]).is_integer() for k in ("width", "height"))
    if not is_int(im["id"]) or not sizes_ok:
        raise _record_error(
            path, where, im, "needs an int 'id' and positive integer 'width'/'height'", "fix the image record"
        )
    fix = "give each image its path relative to the image folder as 'file_name'"
    if "file_name" in im:
        name = im["file_name"]
        if not isinstance(name, str) or not name or "\0" in name:
            raise _record_error(
                path, where, im, f"has file_name {name!r}, not a non-empty path string", fix + " (a string)"
            )
    elif file_names and not isinstance(im.get("coco_url"), str):
        raise _record_error(path, where, im, "has neither 'file_name' nor 'coco_url'", fix)


def image_file_name(image: dict) -> str:
    """Path of a checked image record relative to the images folder (:func:`read_images` with
    ``file_names``). LVIS v1 has no ``file_name``; its images are COCO 2017's, named by
    ``coco_url`` (``.../val2017/000000397133.jpg`` -> ``val2017/000000397133.jpg``)."""
    if "file_name" in image:
        return image["file_name"]
    return "/".join(image["coco_url"].split("/")[-2:])


def inside_folder(file_name: str) -> bool:
    """Whether a relative image path stays inside its folder (no absolute path, no ``..``).

    Lexical, so it costs nothing per image; a symlink pointing out is refused when the image is
    read (``backbones.image.resolve_image_path``).
    """
    path = PurePosixPath(file_name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and not PureWindowsPath(file_name).drive


def check_annotations(anns: object, path: str | Path, category_ids: set[int]) -> None:
    """Every annotation: int image_id, an int category_id of a listed category, a bbox of 4
    numbers; int ids unique. One pass; a record outside the common exact types (e.g. a missing
    key, NumPy scalars from an in-memory file) goes through the detailed check, which says what
    is wrong."""
    if not isinstance(anns, list):
        raise AnnotationError(f"{path}: 'annotations' must be a list of annotation records")
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        box = ann.get("bbox") if type(ann) is dict else None
        exact = (
            type(box) is list
            and len(box) == 4
            and {type(box[0]), type(box[1]), type(box[2]), type(box[3])} <= _NUMBER_TYPES
            and type(ann.get("image_id")) is int
            and type(ann.get("category_id")) is int
        )
        if not exact:
            _check_annotation(ann, i, path)
        if ann["category_id"] not in category_ids:
            raise _record_error(
                path,
                f"annotation #{i} (id {ann.get('id')})",
                ann,
                f"has category_id {ann['category_id']}, which is not in 'categories'",
                "every annotation's category must be listed",
            )
        ann_id = ann.get("id")
        if is_int(ann_id):
            if ann_id in seen:
                first = next(j for j, a in enumerate(anns) if a.get("id") == ann_id)
                raise _record_error(
                    path,
                    f"annotation #{i}",
                    ann,
                    f"repeats the id of annotation #{first}",
                    "annotation ids must be unique (the evaluators index boxes by id)",
                )
            seen.add(ann_id)


def _check_annotation(ann: object, i: int, path: str | Path) -> None:
    """One annotation: int image_id and category_id, a bbox of 4 numbers."""
    fix = "every annotation needs an int 'image_id', an int 'category_id' and 'bbox': [x, y, w, h]"
    if not isinstance(ann, dict):
        raise _record_error(path, f"annotation #{i}", ann, "is not an object", fix)
    where = f"annotation #{i} (id {ann.get('id')})"
    missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
    if missing:
        raise _record_error(path, where, ann, f"lacks {', '.join(map(repr, missing))}", fix)
    if not is_int(ann["image_id"]) or not is_int(ann["category_id"]):
        raise _record_error(path, where, ann, "has a non-integer image_id or category_id", fix)
    try:
        numbers(ann["bbox"], 4, "bbox [x, y, w, h]")
    except ValueError as err:
        raise _record_error(path, where, ann, str(err), fix) from None


# --------------------------------------------------------------------------------------------
# A ground truth against a shard folder
# --------------------------------------------------------------------------------------------


def check_ground_truth(
    gt: GroundTruth | str | Path,
    vocab: Vocabulary,
    image_ids: set[int] | None,
    shards: str | Path,
    same_vocabulary: bool = False,
) -> GroundTruth:
    """A ground truth must describe a shard folder: name every class of the shards (id and name)
    and hold every image they hold.

    Args:
        gt: the ground truth, or its file (read with :func:`read_ground_truth`).
        vocab: the shards' vocabulary (their manifest's).
        image_ids: the image ids the shards hold, or None when they cannot be listed cheaply
            (then :func:`check_images` once they are known).
        shards: the shard folder, for messages.
        same_vocabulary: also refuse categories the shards do not have (validation AP would
            count classes the head is never asked about).

    Returns:
        the ground truth.
    """
    gt = gt if isinstance(gt, GroundTruth) else read_ground_truth(gt)
    check_classes(gt, vocab, shards, same_vocabulary)
    if image_ids is not None:
        check_images(gt, image_ids, shards)
    return gt


def check_classes(gt: GroundTruth, vocab: Vocabulary, shards: str | Path, same_vocabulary: bool = False) -> None:
    """The shards' classes (category id and name) must all be categories of the ground truth."""
    named = dict(zip(gt.vocab.category_ids, gt.vocab.names))
    missing = [f"{name} (id {cid})" for cid, name in zip(vocab.category_ids, vocab.names) if named.get(cid) != name]
    fix = "pass the annotation file the shards were extracted from"
    if missing:
        raise AnnotationError(
            f"{gt.path} lacks {len(missing)} of the {len(vocab)} classes of the shards {shards}: "
            f"{_listed(missing)} (its {len(gt.vocab)} categories are another vocabulary); {fix}"
        )
    extra = [f"{name} (id {cid})" for cid, name in named.items() if cid not in set(vocab.category_ids)]
    if same_vocabulary and extra:
        raise AnnotationError(
            f"{gt.path} has {len(gt.vocab)} categories, {len(extra)} of them not classes of the shards {shards} "
            f"({_listed(extra)}): their AP would count classes the head is never asked about; {fix}"
        )


def check_images(gt: GroundTruth, image_ids: set[int], shards: str | Path) -> int:
    """The shards' images must all be images of the ground truth; returns how many of its images
    the shards lack (their objects count as missed)."""
    missing = sorted(image_ids - gt.images.keys())
    if missing:
        raise AnnotationError(
            f"{len(missing)} of the {len(image_ids)} images of the shards {shards} are not in {gt.path} (image ids "
            f"{_listed(missing)}): it is the ground truth of another split; pass the annotation file the shards "
            "were extracted from"
        )
    return len(gt.images.keys() - image_ids)
