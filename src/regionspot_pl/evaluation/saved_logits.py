"""One image's logits (:class:`ImageLogits`), and the logits file that keeps a test run's for later
scoring: ``OUT/logits.npz``, written by ``python -m regionspot_pl.test --save_logits true`` and read
by ``python -m regionspot_pl.evaluate GT OUT/logits.npz --scoring regionspot|tap``.

The file holds what either scoring rule needs (boxes, box scores, SAM's predicted IoU, the
region-class logits) so that a run can be scored both ways without running the head again. It is
a NumPy ``.npz`` of plain arrays, read with ``allow_pickle=False``; boxes of all images are
concatenated in image order:

================  ===============  ================================================================
member            dtype, shape     meaning
================  ===============  ================================================================
``format``        int64 []         ``LOGITS_FORMAT_VERSION``
``image_ids``     int64 [I]        the images, in shard order
``box_counts``    int64 [I]        boxes of each image
``boxes``         float32 [B, 4]   xyxy, original pixels
``box_scores``    float32 [B]      proposal score, 1 for GT boxes
``iou``           float32 [B]      SAM's predicted IoU of each box's mask
``logits``        float32 [B, C]   region-class logits, exactly as ``test`` scored them
``category_ids``  int64 [C]        the dataset category id of each logit column
``masks``         uint8 [bytes]    optional: JSON, per image the list of its boxes' COCO RLEs
================  ===============  ================================================================

Logits are float32 (4 bytes per box and class: about 4.8 KB a box for LVIS's 1,203 classes), so
that scoring the file gives exactly the detections ``test`` wrote.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import RegionSpotError
from ..utils.io import AtomicFile, array_mismatch

LOGITS_FILE = "logits.npz"
# 1: the members above. A file of another version is refused with the command that rewrites it.
LOGITS_FORMAT_VERSION = 1
_MEMBERS = {
    "format": (np.int64, 0),
    "image_ids": (np.int64, 1),
    "box_counts": (np.int64, 1),
    "boxes": (np.float32, 2),
    "box_scores": (np.float32, 1),
    "iou": (np.float32, 1),
    "logits": (np.float32, 2),
    "category_ids": (np.int64, 1),
}
_REWRITE = "write it again with `python -m regionspot_pl.test ... --save_logits true`"


class LogitsFileError(RegionSpotError, ValueError):
    """A logits file is missing, of another format version, or malformed."""


@dataclass
class ImageLogits:
    """One image's boxes and their region-class logits."""

    image_id: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels
    scores: np.ndarray  # float32 [N] box scores (1 for GT boxes)
    iou: np.ndarray  # float32 [N] SAM's predicted IoU of each box's mask
    logits: Tensor  # [N, C] on CPU
    masks: list[dict] | None  # N COCO RLEs of the SAM masks, or None (shards extracted with --masks false)


@dataclass
class SavedLogits:
    """A logits file read back: the category id of each logit column, and every image's logits."""

    category_ids: list[int]
    images: list[ImageLogits]

    @property
    def has_masks(self) -> bool:
        return all(item.masks is not None for item in self.images)


class LogitsWriter:
    """Collects the images of a test run (:meth:`add`) and writes them as one logits file (:meth:`write`)."""

    def __init__(self, category_ids: list[int]) -> None:
        self.category_ids = list(category_ids)
        self.images: list[ImageLogits] = []

    def add(self, item: ImageLogits) -> None:
        """One image (its logits copied: a stream's may be views of a whole padded batch)."""
        if item.logits.shape[-1] != len(self.category_ids):
            raise ValueError(f"{item.logits.shape[-1]} logit columns for {len(self.category_ids)} categories")
        self.images.append(replace(item, logits=item.logits.detach().float().cpu().clone()))

    def write(self, path: str | Path) -> Path:
        """The file at ``path``, written atomically."""
        items, num_classes = self.images, len(self.category_ids)
        arrays = {
            "format": np.array(LOGITS_FORMAT_VERSION, np.int64),
            "image_ids": np.array([it.image_id for it in items], np.int64),
            "box_counts": np.array([len(it.boxes) for it in items], np.int64),
            "boxes": _cat([it.boxes for it in items], (0, 4), np.float32),
            "box_scores": _cat([it.scores for it in items], (0,), np.float32),
            "iou": _cat([it.iou for it in items], (0,), np.float32),
            "logits": _cat([it.logits.float().numpy() for it in items], (0, num_classes), np.float32),
            "category_ids": np.array(self.category_ids, np.int64),
        }
        if items and all(it.masks is not None for it in items):
            arrays["masks"] = np.frombuffer(json.dumps([it.masks for it in items]).encode(), np.uint8)
        with AtomicFile(path) as tmp, open(tmp, "xb") as f:
            np.savez(f, **arrays)
        return Path(path)


def _cat(parts: list[np.ndarray], empty: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype) for p in parts]) if parts else np.zeros(empty, dtype)


def read_logits(path: str | Path) -> SavedLogits:
    """A logits file, every member's dtype and shape checked (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise LogitsFileError(f"logits file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would guess at a pickle
        raise LogitsFileError(f"{path} is not a logits file (not an .npz archive); {_REWRITE}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise LogitsFileError(f"{path} is not a logits file ({err}); {_REWRITE}") from None
    _check_members(arrays, path)
    counts = arrays["box_counts"]
    ends = np.cumsum(counts)
    masks = _masks(arrays, counts, path) if "masks" in arrays else [None] * len(counts)
    images = []
    for i, (image_id, end, count) in enumerate(zip(arrays["image_ids"].tolist(), ends.tolist(), counts.tolist())):
        rows = slice(end - count, end)
        images.append(
            ImageLogits(
                image_id=image_id,
                boxes=arrays["boxes"][rows],
                scores=arrays["box_scores"][rows],
                iou=arrays["iou"][rows],
                logits=torch.from_numpy(arrays["logits"][rows]),
                masks=masks[i],
            )
        )
    return SavedLogits(arrays["category_ids"].tolist(), images)


def _check_members(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Version, dtypes and shapes: one error naming the member and the fix."""
    version = arrays.get("format")
    if version is None or version.shape != () or int(version) != LOGITS_FORMAT_VERSION:
        found = "none" if version is None else version.tolist()
        raise LogitsFileError(
            f"{path} is of logits format {found}, not the format {LOGITS_FORMAT_VERSION} this version reads; {_REWRITE}"
        )
    for name, (dtype, ndim) in _MEMBERS.items():
        a = arrays.get(name)
        if a is None:
            raise LogitsFileError(f"{path} lacks member {name!r}; {_REWRITE}")
        if (wrong := array_mismatch(a, dtype, ndim)) is not None:
            raise LogitsFileError(f"{path}: member {name!r} {wrong}; {_REWRITE}")
    counts, num_boxes = arrays["box_counts"], len(arrays["boxes"])
    shapes_fit = (
        len(arrays["image_ids"]) == len(counts)
        and (counts >= 0).all()
        and int(counts.sum()) == num_boxes
        and arrays["boxes"].shape[1] == 4
        and len(arrays["box_scores"]) == len(arrays["iou"]) == num_boxes
        and arrays["logits"].shape == (num_boxes, len(arrays["category_ids"]))
    )
    if not shapes_fit:
        sizes = ", ".join(f"{k} {arrays[k].shape}" for k in _MEMBERS if k != "format")
        raise LogitsFileError(f"{path}: the members' sizes disagree ({sizes}); {_REWRITE}")


def _masks(arrays: dict[str, np.ndarray], counts: np.ndarray, path: Path) -> list[list[dict]]:
    """The ``masks`` member: one list of RLEs per image, as long as its box count."""
    member = arrays["masks"]
    try:
        if member.dtype != np.uint8 or member.ndim != 1:
            raise ValueError(f"{member.dtype} {member.shape}, expected uint8 bytes")
        masks = json.loads(member.tobytes())
        if not isinstance(masks, list) or [len(m) if isinstance(m, list) else -1 for m in masks] != counts.tolist():
            raise ValueError("not one list of RLEs per image, as long as its box count")
    except (ValueError, UnicodeDecodeError) as err:
        raise LogitsFileError(f"{path}: member 'masks' is malformed ({err}); {_REWRITE}") from None
    return masks
