"""The feature cache: WebDataset tar shards of per-image SAM/CLIP features.

One sample per image, key = image id; members (all NumPy ``.npy`` without pickle, plus JSON):

==============  =================  ==================================================
member          dtype, shape       meaning
==============  =================  ==================================================
``sam.npy``     float16 [N, 256]   SAM position-aware token per box
``boxes.npy``   float32 [N, 4]     boxes, xyxy in original image pixels
``labels.npy``  int64 [N]          contiguous class index, -1 if unknown (proposals)
``scores.npy``  float32 [N]        box score, 1 for ground-truth boxes
``clip.npy``    float16 [T, D]     CLIP vision tokens, class token first
``json``        object             image_id, file_name, width, height, dataset, masks
==============  =================  ==================================================

``masks`` is a list of N COCO RLEs (``{"size": [H, W], "counts": str}``) of the box-prompted
SAM masks, or absent when extraction ran with masks off. Shards are named
``{dataset}-r{rank:03d}-{index:06d}.tar``; each has a sidecar ``.json`` with its counts.
A folder of shards also holds ``manifest.json`` (vocabulary, backbones, config).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds

ARRAY_MEMBERS = {
    "sam.npy": (np.float16, 2),
    "boxes.npy": (np.float32, 2),
    "labels.npy": (np.int64, 1),
    "scores.npy": (np.float32, 1),
    "clip.npy": (np.float16, 2),
}
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardFormatError(ValueError):
    """A shard sample or folder does not follow the cache format."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    image_id: int,
    sam: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    clip: np.ndarray,
    meta: dict,
) -> dict:
    """Arrays and metadata of one image -> a webdataset sample (member name -> bytes)."""
    arrays = {"sam": sam, "boxes": boxes, "labels": labels, "scores": scores, "clip": clip}
    arrays = {k: np.ascontiguousarray(v, dtype=ARRAY_MEMBERS[f"{k}.npy"][0]) for k, v in arrays.items()}
    meta = {"image_id": int(image_id), **meta}
    # the checks a reader makes, on the arrays themselves: never write what a reader would refuse
    validate_sample({"__key__": str(int(image_id)), **arrays, "meta": meta})
    sample = {"__key__": str(int(image_id))}
    sample.update({f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()})
    sample["json"] = json.dumps(meta, separators=(",", ":")).encode()
    return sample


def decode_sample(sample: dict) -> dict:
    """A raw webdataset sample (member -> bytes) -> dict of arrays and ``meta``. No pickle."""
    key = sample.get("__key__", "?")
    out = {"__key__": key}
    for name in ARRAY_MEMBERS:
        if name not in sample:
            raise ShardFormatError(f"sample {key} ({sample.get('__url__', 'unknown shard')}) lacks member {name}")
        try:
            out[name[:-4]] = np.load(io.BytesIO(sample[name]), allow_pickle=False)
        except ValueError as err:
            raise ShardFormatError(f"sample {key}: member {name} is not a plain .npy array ({err})") from err
    try:
        out["meta"] = json.loads(sample["json"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"sample {key}: missing or invalid json member ({err})") from err
    return out


def validate_sample(s: dict) -> dict:
    """Check dtypes and that the per-box arrays agree; returns the sample."""
    key = s.get("__key__", "?")
    for name, (dtype, ndim) in ARRAY_MEMBERS.items():
        a = s[name[:-4]]
        if a.dtype != dtype or a.ndim != ndim:
            raise ShardFormatError(f"sample {key}: {name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} with {ndim} dims")
    n = len(s["sam"])
    if s["sam"].shape[1] != 256 or s["boxes"].shape != (n, 4) or len(s["labels"]) != n or len(s["scores"]) != n:
        raise ShardFormatError(
            f"sample {key}: per-box arrays disagree: sam {s['sam'].shape}, boxes {s['boxes'].shape}, "
            f"labels {s['labels'].shape}, scores {s['scores'].shape}"
        )
    masks = s["meta"].get("masks")
    if masks is not None and len(masks) != n:
        raise ShardFormatError(f"sample {key}: {len(masks)} masks for {n} boxes")
    return s


def shard_name(dataset: str, rank: int, index: int) -> str:
    return f"{dataset}-r{rank:03d}-{index:06d}.tar"


class AtomicShardWriter:
    """Writes one shard under a temporary name; ``commit`` renames it into place.

    A reader or a resumed run only ever sees complete shards: a crash leaves at most a
    ``.tmp`` file, which the next run overwrites.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")
        # fixed mtime: the same inputs give byte-identical shards (resume == uninterrupted run)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self.samples = 0
        self.boxes = 0

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.samples += 1
        self.boxes += int(np.load(io.BytesIO(sample["labels.npy"]), allow_pickle=False).shape[0])

    def commit(self, sidecar: dict) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        write_json_atomic(self.path.with_suffix(".json"), {"samples": self.samples, "boxes": self.boxes, **sidecar})
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: object) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a shard folder, with a clear error when it is missing."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ShardFormatError(f"shard folder not found: {folder}")
    if not path.is_file():
        raise ShardFormatError(
            f"{folder} has no {MANIFEST}: is it a folder written by `python -m regionspot_pl.extract --out`?"
        )
    return json.loads(path.read_text())


def list_shards(folder: str | Path) -> list[Path]:
    """Complete shards of a folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardFormatError(f"shard folder not found: {folder}")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise ShardFormatError(f"no .tar shards in {folder}: run `python -m regionspot_pl.extract --out {folder}` first")
    return shards


def shard_counts(folder: str | Path) -> dict:
    """Samples and boxes over the complete shards of a folder (from their sidecars)."""
    total = {"shards": 0, "samples": 0, "boxes": 0, "skipped": 0}
    for shard in sorted(Path(folder).glob("*.tar")):
        side = json.loads(shard.with_suffix(".json").read_text())
        total["shards"] += 1
        total["samples"] += side["samples"]
        total["boxes"] += side["boxes"]
        total["skipped"] += len(side.get("skipped", []))
    return total


def iter_samples(shards: list[str | Path]):
    """Decoded, validated samples of the given shards, in order (for evaluation and tests)."""
    dataset = wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False)
    for raw in dataset:
        yield validate_sample(decode_sample(raw))
