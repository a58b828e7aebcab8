"""The feature cache: WebDataset tar shards of per-image SAM/CLIP features.

One sample per image, key = image id; members (all NumPy ``.npy`` without pickle, plus JSON):

==============  =================  ==================================================
member          dtype, shape       meaning
==============  =================  ==================================================
``sam.npy``     float16 [N, 256]   SAM position-aware token per box
``boxes.npy``   float32 [N, 4]     boxes, xyxy in original image pixels
``labels.npy``  int64 [N]          contiguous class index, -1 if unknown (proposals)
``scores.npy``  float32 [N]        box score, 1 for ground-truth boxes
``iou.npy``     float32 [N]        SAM's predicted IoU of each box's mask (may lie outside [0, 1])
``clip.npy``    float16 [T, D]     CLIP vision tokens, class token first
``json``        object             image_id, file_name, width, height, dataset, masks
==============  =================  ==================================================

``masks`` is a list of N COCO RLEs (``{"size": [H, W], "counts": str}``) of the box-prompted
SAM masks, or absent when extraction ran with masks off. Shards are named
``{dataset}-r{rank:03d}-{index:06d}.tar``; each has a sidecar ``.json`` with its counts.
A folder of shards also holds ``manifest.json`` (:mod:`regionspot_pl.cache.manifest`).

``iou`` is float32, as the encoder returns it: 4 bytes a box beside the token's 512, and the
scores TAP's rule multiplies it into (``evaluation/scoring.py``) stay unrounded.

Reading is the training loader's hot loop, so it avoids copies: tar members are read with one
``read`` each (webdataset's ``tarfile`` stream copies every member several times; the cost is
in docs/benchmarks.md) and the ``.npy`` arrays are NumPy views of those bytes.
webdataset still opens the URLs and groups members into samples.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, url_opener

from ..errors import RegionSpotError
from ..utils.io import AtomicFile, array_mismatch, write_json_atomic

ARRAY_MEMBERS = {
    "sam.npy": (np.float16, 2),
    "boxes.npy": (np.float32, 2),
    "labels.npy": (np.int64, 1),
    "scores.npy": (np.float32, 1),
    "iou.npy": (np.float32, 1),
    "clip.npy": (np.float16, 2),
}


class ShardFormatError(RegionSpotError, ValueError):
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
    *,
    iou: np.ndarray,
) -> dict:
    """Arrays and metadata of one image -> a webdataset sample (member name -> bytes).

    ``iou``: [N] the segmenter's predicted IoU of each box's mask (``RegionFeatures.iou``)."""
    arrays = {"sam": sam, "boxes": boxes, "labels": labels, "scores": scores, "iou": iou, "clip": clip}
    arrays = {k: np.ascontiguousarray(v, dtype=ARRAY_MEMBERS[f"{k}.npy"][0]) for k, v in arrays.items()}
    meta = {"image_id": int(image_id), **meta}
    # the checks a reader makes, on the arrays themselves: never write what a reader would refuse
    validate_sample({"__key__": str(int(image_id)), **arrays, "meta": meta})
    sample = {"__key__": str(int(image_id))}
    sample.update({f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()})
    sample["json"] = json.dumps(meta, separators=(",", ":")).encode()
    return sample


def decode_sample(sample: dict) -> dict:
    """A raw webdataset sample (member -> bytes) -> dict of arrays and ``meta``. No pickle.

    ``clip`` is a read-only view of the member's bytes (no copy: it is most of a sample's
    bytes and ``collate_regions`` copies it into the batch anyway); the small per-box arrays are
    writable copies.
    """
    key = sample.get("__key__", "?")
    out = {"__key__": key}
    if "__url__" in sample:  # the shard, for error messages downstream
        out["__url__"] = sample["__url__"]
    for name in ARRAY_MEMBERS:
        if name not in sample:
            raise ShardFormatError(
                f"sample {key} ({sample.get('__url__', 'unknown shard')}) lacks member {name}: it is not a "
                "shard of this version's cache format; re-extract it with `python -m regionspot_pl.extract`"
            )
        try:
            array = npy_view(sample[name])
        except ValueError as err:
            raise ShardFormatError(f"sample {key}: member {name} is not a plain .npy array ({err})") from err
        out[name[:-4]] = array if name == "clip.npy" else array.copy()
    try:
        out["meta"] = json.loads(sample["json"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"sample {key}: missing or invalid json member ({err})") from err
    return out


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[tuple[int, ...], np.dtype, bool, int]] = {}


def npy_view(data: bytes) -> np.ndarray:
    """The array stored in ``.npy`` bytes, as a read-only view of them (``np.load`` without the copy).

    Headers are parsed by NumPy's own ``np.lib.format`` (a literal, never a pickle) and cached:
    a cache holds few distinct ones (the CLIP member's is the same in every sample).
    Raises ValueError for object arrays, unknown versions and a size that disagrees with the header.
    """
    if data[:6] != _NPY_MAGIC or data[6:7] not in (b"\x01", b"\x02", b"\x03"):
        raise ValueError("no .npy magic/version")
    header_end = (
        10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    )
    header = data[:header_end]
    parsed = _npy_headers.get(header)
    if parsed is None:
        fp = io.BytesIO(header)
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
        if dtype.hasobject:
            raise ValueError(f"dtype {dtype} holds Python objects, which would need pickle")
        if len(_npy_headers) > 4096:  # shapes vary with box counts; keep the cache bounded
            _npy_headers.clear()
        parsed = _npy_headers[header] = (shape, dtype, fortran, int(np.prod(shape)))
    shape, dtype, fortran, count = parsed
    if len(data) - header_end != count * dtype.itemsize:
        raise ValueError(f"{len(data) - header_end} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype, count, header_end).reshape(shape, order="F" if fortran else "C")


def validate_sample(s: dict) -> dict:
    """Check dtypes and that the per-box arrays agree; returns the sample."""
    key = s.get("__key__", "?")
    for name, (dtype, ndim) in ARRAY_MEMBERS.items():
        if (wrong := array_mismatch(s[name[:-4]], dtype, ndim)) is not None:
            raise ShardFormatError(f"sample {key}: {name} {wrong}")
    n = len(s["sam"])
    if (
        s["sam"].shape[1] != 256
        or s["boxes"].shape != (n, 4)
        or any(len(s[k]) != n for k in ("labels", "scores", "iou"))
    ):
        raise ShardFormatError(
            f"sample {key}: per-box arrays disagree: sam {s['sam'].shape}, boxes {s['boxes'].shape}, "
            f"labels {s['labels'].shape}, scores {s['scores'].shape}, iou {s['iou'].shape}"
        )
    masks = s["meta"].get("masks")
    if masks is not None and len(masks) != n:
        raise ShardFormatError(f"sample {key}: {len(masks)} masks for {n} boxes")
    return s


def shard_name(dataset: str, rank: int, index: int) -> str:
    return f"{dataset}-r{rank:03d}-{index:06d}.tar"


class AtomicShardWriter:
    """Writes one shard under a temporary name (an :class:`~regionspot_pl.utils.io.AtomicFile`);
    ``commit`` renames it into place.

    A reader or a resumed run only ever sees complete shards: a crash leaves at most a
    ``{shard}.*.tmp`` file, which the next run of the rank deletes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._target = AtomicFile(self.path)
        self._file = open(self._target.tmp, "wb")
        # fixed mtime: the same inputs give byte-identical shards (resume == uninterrupted run)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self.samples = 0
        self.boxes = 0
        self.labelled_boxes = 0  # boxes with a class: what training learns from
        self.max_label = -1  # checked against the manifest's vocabulary by readers

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        labels = npy_view(sample["labels.npy"])
        self.samples += 1
        self.boxes += len(labels)
        self.labelled_boxes += int((labels >= 0).sum())
        self.max_label = max(self.max_label, int(labels.max(initial=-1)))

    def commit(self, sidecar: dict) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        counts = {
            "samples": self.samples,
            "boxes": self.boxes,
            "labelled_boxes": self.labelled_boxes,
            "max_label": self.max_label,
        }
        write_json_atomic(self.path.with_suffix(".json"), {**counts, **sidecar})
        return self._target.commit()

    def abort(self) -> None:
        self._file.close()
        self._target.abort()


def list_shards(folder: str | Path) -> list[Path]:
    """Complete shards of a folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardFormatError(f"shard folder not found: {folder}")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise ShardFormatError(
            f"no .tar shards in {folder}: run `python -m regionspot_pl.extract --out {folder}` first"
        )
    return shards


def read_sidecar(shard: str | Path) -> dict | None:
    """A local shard's sidecar counts, or None where there is none (a hand-made or remote shard)."""
    path = Path(shard).with_suffix(".json")
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardFormatError(
            f"{path} (the sidecar of {shard}) is not valid JSON ({err}); re-extract the shard"
        ) from err
    if not isinstance(side, dict) or not isinstance(side.get("samples"), int):
        raise ShardFormatError(f"{path} (the sidecar of {shard}) has no sample count; re-extract the shard")
    return side


def skip_reason(entry: object) -> str:
    """The reason of one ``skipped`` sidecar entry (plain strings are from before reasons were kept)."""
    return entry.get("reason", "unreadable") if isinstance(entry, dict) else "unreadable"


def shard_counts(folder: str | Path, shards: Iterable[str | Path] | None = None) -> dict:
    """Samples, boxes and skipped images by reason over complete shards (from their sidecars).

    ``shards``: the ones to count (default: every ``*.tar`` of the folder).
    """
    total = {"shards": 0, "samples": 0, "boxes": 0, "labelled_boxes": 0, "skipped": 0, "skipped_by_reason": {}}
    for shard in sorted(Path(folder).glob("*.tar")) if shards is None else shards:
        side = read_sidecar(shard) or {"samples": 0, "boxes": 0}
        total["shards"] += 1
        total["samples"] += side["samples"]
        total["boxes"] += side.get("boxes", 0)
        total["labelled_boxes"] += side.get("labelled_boxes", 0)
        for entry in side.get("skipped", []):
            total["skipped"] += 1
            reason = skip_reason(entry)
            total["skipped_by_reason"][reason] = total["skipped_by_reason"].get(reason, 0) + 1
    return total


def shard_keys(path: str | Path) -> set[str]:
    """The sample keys of a local shard, from its tar headers alone (member data is skipped over)."""
    keys: set[str] = set()
    with open(path, "rb") as f:
        while True:
            header = f.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK or header.count(0) == TAR_BLOCK:
                return keys
            try:
                size = _octal(header[124:136])
            except ValueError:
                raise ShardFormatError(
                    f"{_at(str(path), f.tell() - TAR_BLOCK)}: not a tar header; re-extract the shard"
                ) from None
            name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
            if header[156:157] in (b"0", b"\0"):
                keys.add(name.rsplit("/", 1)[-1].split(".", 1)[0])
            f.seek(size + (-size % TAR_BLOCK), os.SEEK_CUR)


TAR_BLOCK = 512


def _at(url: str, offset: int) -> str:
    """Where a tar header sits, for error messages (formatted only when one is raised)."""
    return f"shard {url}, byte {offset}"


def _octal(field: bytes) -> int:
    """A ustar number field: octal digits padded with NULs or spaces."""
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def tar_members(stream, url: str) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` of each regular file of a ustar stream, one ``read`` each.

    The ustar subset our writer (and ``tar``) produces: a checksum checked on every header, the
    end-of-archive block required, directories skipped, extended (pax/GNU) headers refused.
    """
    offset = 0
    while True:
        header = stream.read(TAR_BLOCK)
        if not header:  # a copy cut at a member boundary: the samples after it would be lost silently
            raise ShardFormatError(
                f"{_at(url, offset)}: the shard ends without tar's end-of-archive blocks; it is "
                "truncated, re-extract or re-copy it"
            )
        if header.count(0) == TAR_BLOCK:  # end of archive
            return
        if len(header) < TAR_BLOCK:
            raise ShardFormatError(f"{_at(url, offset)}: truncated tar header; the shard is incomplete, re-extract it")
        try:
            checksum, size = _octal(header[148:156]), _octal(header[124:136])
        except ValueError:
            raise ShardFormatError(
                f"{_at(url, offset)}: not a tar header; the file is corrupt or not a shard"
            ) from None
        if checksum != 256 + sum(header[:148]) + sum(header[156:]):  # checksum field counted as spaces
            raise ShardFormatError(
                f"{_at(url, offset)}: tar header checksum mismatch; the shard is corrupt, re-extract it"
            )
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        data = stream.read(size)
        if len(data) < size:
            raise ShardFormatError(
                f"{_at(url, offset)}: member {name.decode(errors='replace')} is truncated; re-extract the shard"
            )
        stream.read(-size % TAR_BLOCK)
        offset += TAR_BLOCK + size + (-size % TAR_BLOCK)
        if kind in (b"0", b"\0"):
            yield {"fname": (prefix + b"/" + name if prefix else name).decode(), "data": data, "__url__": url}
        elif kind in (b"x", b"g", b"L", b"K"):
            raise ShardFormatError(
                f"{_at(url, offset)}: pax/GNU extended tar header, which the shard reader does not read; "
                "re-pack the shard with `tar --format=ustar` (regionspot_pl's writer never writes one)"
            )


def _expand_shards(sources: Iterable[dict]) -> Iterator[dict]:
    for source in sources:
        with source["stream"] as stream:
            yield from tar_members(stream, source["url"])
        yield {}  # webdataset's end-of-shard marker: samples never span shards


def decoded_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """A webdataset pipeline stage: ``{"url": ...}`` items -> decoded, validated samples.

    URLs are anything webdataset opens (a path, ``pipe:``, ``http(s):``).
    """
    for raw in group_by_keys(_expand_shards(url_opener(sources))):
        yield validate_sample(decode_sample(raw))


def iter_samples(shards: list[str | Path]) -> Iterator[dict]:
    """Decoded, validated samples of the given shards, in order (for evaluation and tests)."""
    return decoded_samples({"url": str(s)} for s in shards)
