"""Small helpers every stage shares: JSON files read with a clear error and written atomically,
masks as COCO RLEs, and a stream cut into batches. (Images are read in one place too:
:func:`regionspot_pl.backbones.image.read_image`.)"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..errors import RegionSpotError

T = TypeVar("T")


class JsonFileError(RegionSpotError):
    """A JSON file is missing or not valid JSON."""


class OutputError(RegionSpotError):
    """An output file or folder cannot be written (permissions, a full disk, a file in the way)."""


def read_json(path: str | Path, what: str, error: type[RegionSpotError] = JsonFileError) -> Any:
    """The content of a JSON file; ``error`` (naming ``what`` and the path) when it is missing or
    not JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{what} {path} is not valid JSON: {err}") from None


def write_json_atomic(path: str | Path, obj: object, indent: int | None = 1) -> Path:
    """Write JSON under a temporary name unique to this call, then rename it into place: a reader
    never sees half a file, and two writers of one path (ranks writing the manifest) never
    rename each other's temporary file away. ``indent=None`` writes it compact."""
    path = Path(path)
    # not tempfile.mkstemp: its files are private (0600); this one gets the umask's permissions
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")
    separators = (",", ":") if indent is None else None
    try:
        with open(tmp, "x") as f:
            json.dump(obj, f, indent=indent, separators=separators)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def masks_to_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """[N, H, W] bool masks -> N COCO RLEs ``{"size": [H, W], "counts": str}`` (JSON-safe)."""
    if len(masks) == 0:
        return []
    array = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    fortran = np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8))
    return [rle_to_json(r) for r in mask_utils.encode(fortran)]


def rle_to_json(rle: dict[str, Any]) -> dict[str, Any]:
    """pycocotools encodes counts as bytes; JSON (and the results format) wants str."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
