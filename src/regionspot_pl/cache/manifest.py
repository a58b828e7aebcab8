"""A shard folder of the feature cache: its typed manifest, and the reader of the whole folder.

``extract`` writes ``manifest.json`` next to the shards: how the features were made (protocol,
precision, backbones), the vocabulary the labels index, and the counts. Every reader (``fit``,
``test``, the benchmarks) goes through :meth:`Manifest.read` / :meth:`ShardFolder.read`, which
check the format version and the protocol, so shards of another format or inference path are
refused with the fix instead of giving other numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from ..data.annotations import Vocabulary
from ..utils.io import read_json, write_json_atomic
from .shards import ShardFormatError, list_shards, read_sidecar, shard_counts, shard_keys

MANIFEST = "manifest.json"
SHARD_URLS = "shards.txt"
# 2: every sample holds iou.npy (SAM's predicted IoU per box); format 1 shards lack it.
FORMAT_VERSION = 2
# How the features were computed (the image path, SAM/CLIP inputs, prompts): the reference's
# inference path since "reference-v1". Shards of any other protocol give other numbers, so
# fit and test refuse them.
PROTOCOL = "reference-v1"


@dataclass(frozen=True)
class ClipBackbone:
    """The vision-language model the features came from: folder, identity, input size, tokens,
    widths and its logit scale (exp of its learnt temperature), the scale its heads' logits take."""

    model: str
    id: str
    image_size: int
    tokens: int
    vision_dim: int
    text_dim: int
    logit_scale: float


@dataclass(frozen=True)
class SamBackbone:
    """The SAM the region tokens came from."""

    type: str
    checkpoint: str
    sha256_16: str
    image_size: int


@dataclass
class Manifest:
    """``manifest.json`` of a shard folder.

    ``annotations``: digests of the input files and what was dropped reading them;
    ``config``: the extraction's settings; ``counts``: samples, boxes and skipped images of the
    finished shards (None while an extraction runs).
    """

    vocabulary: Vocabulary
    sam: SamBackbone
    clip: ClipBackbone
    text_cache: str
    precision: str
    dataset: str | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] | None = None
    protocol: str = PROTOCOL
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "protocol": self.protocol,
            "precision": self.precision,
            "dataset": self.dataset,
            "vocabulary": self.vocabulary.to_dict(),
            "backbones": {"sam": asdict(self.sam), "clip": asdict(self.clip)},
            "text_cache": self.text_cache,
            "annotations": self.annotations,
            "config": self.config,
        }
        if self.counts is not None:
            out["counts"] = self.counts
        return out

    def write(self, folder: str | Path) -> Path:
        return write_json_atomic(Path(folder) / MANIFEST, self.to_dict())

    @classmethod
    def from_dict(cls, data: object, path: str | Path) -> Manifest:
        """The manifest read from ``path``, every field checked."""
        folder = Path(path).parent
        if not isinstance(data, dict):
            raise ShardFormatError(f"{path} must hold a JSON object; re-extract {folder}")
        _check_version(data.get("format_version"), path)
        _check_protocol(data.get("protocol"), folder)
        backbones = data.get("backbones") if isinstance(data.get("backbones"), dict) else {}
        return cls(
            vocabulary=_vocabulary(data.get("vocabulary"), path),
            sam=_typed(SamBackbone, backbones.get("sam"), path, "backbones.sam"),
            clip=_typed(ClipBackbone, backbones.get("clip"), path, "backbones.clip"),
            text_cache=_typed_value(data.get("text_cache"), str, path, "text_cache"),
            precision=_typed_value(data.get("precision"), str, path, "precision"),
            dataset=data.get("dataset") if isinstance(data.get("dataset"), str) else None,
            annotations=data.get("annotations") if isinstance(data.get("annotations"), dict) else {},
            config=data.get("config") if isinstance(data.get("config"), dict) else {},
            counts=data.get("counts") if isinstance(data.get("counts"), dict) else None,
        )

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        """The manifest of a shard folder, with a clear error when it is missing or does not fit."""
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise ShardFormatError(f"shard folder not found: {folder}")
        if not path.is_file():
            raise ShardFormatError(
                f"{folder} has no {MANIFEST}: is it a folder written by `python -m regionspot_pl.extract --out`?"
            )
        return cls.from_dict(read_json(path, "manifest", ShardFormatError), path)


def _check_version(found: object, path: str | Path) -> None:
    if found == FORMAT_VERSION:
        return
    if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT_VERSION:
        raise ShardFormatError(
            f"{path} is of cache format {found}, newer than the format {FORMAT_VERSION} this version of "
            "regionspot_pl reads: upgrade regionspot_pl"
        )
    raise ShardFormatError(
        f"{path} is of cache format {found!r}, not the format {FORMAT_VERSION} this version reads: re-extract "
        f"{Path(path).parent} with `python -m regionspot_pl.extract` into an empty folder"
    )


def _check_protocol(found: object, folder: Path) -> None:
    if found != PROTOCOL:
        raise ShardFormatError(
            f"the shards in {folder} were extracted with the feature protocol "
            f"{found or 'from before protocols were recorded'}, not this version's {PROTOCOL!r} "
            "(the reference's image path and prompts): re-extract them with "
            f"`python -m regionspot_pl.extract --out {folder}` into an empty folder"
        )


_FIX = "restore the manifest written by the extraction, or re-extract"


def _typed_value(value: object, tp: type, path: str | Path, key: str) -> Any:
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ShardFormatError(f"{path}: {key!r} must be {tp.__name__}, got {value!r}; {_FIX}")
    return value


def _typed(cls: type, data: object, path: str | Path, key: str) -> Any:
    """A backbone record: every field present with its type."""
    if not isinstance(data, dict):
        raise ShardFormatError(f"{path}: {key!r} is missing; {_FIX}")
    values = {}
    for f in cls.__dataclass_fields__.values():
        tp = {"int": int, "float": float}.get(f.type, str)
        value = data.get(f.name)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # JSON writes 100.0 as 100 in some writers
        values[f.name] = _typed_value(value, tp, path, f"{key}.{f.name}")
        if tp is float and not (math.isfinite(value) and value > 0):  # a scale: positive and finite
            raise ShardFormatError(f"{path}: {key}.{f.name} must be a positive number, got {value!r}; {_FIX}")
    return cls(**values)


def _vocabulary(vocab: object, path: str | Path) -> Vocabulary:
    """The manifest's vocabulary: names and category ids, one per class, at least one class."""
    names = vocab.get("names") if isinstance(vocab, dict) else None
    ids = vocab.get("category_ids") if isinstance(vocab, dict) else None
    if not isinstance(names, list) or not isinstance(ids, list) or len(names) != len(ids):
        raise ShardFormatError(f"{path}: 'vocabulary' needs lists 'names' and 'category_ids' of one length; {_FIX}")
    if not names:
        raise ShardFormatError(f"{path}: the vocabulary has 0 classes, so there is nothing to name; {_FIX}")
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ShardFormatError(f"{path}: the vocabulary's category_ids must be distinct integers; {_FIX}")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ShardFormatError(f"{path}: every vocabulary name must be a non-empty string; {_FIX}")
    return Vocabulary.from_dict(vocab)


@dataclass
class ShardFolder:
    """A shard folder as readers see it: its shards (paths or URLs), vocabulary and manifest.

    ``counts``: samples, boxes, labelled_boxes (None where a sidecar predates it), skipped and
    skipped_by_reason, from the sidecars of local shards; None for streamed shards (shards.txt).
    """

    folder: str
    shards: list[str]
    manifest: Manifest
    counts: dict | None = None

    @property
    def vocabulary(self) -> Vocabulary:
        return self.manifest.vocabulary

    @property
    def clip(self) -> ClipBackbone:
        return self.manifest.clip

    @property
    def name(self) -> str:
        return self.manifest.dataset or Path(self.folder).name

    @classmethod
    def read(cls, folder: str | Path) -> ShardFolder:
        """A shard folder: its manifest, and its ``*.tar`` files or, to stream them from object
        storage, the URLs listed in ``shards.txt`` (anything webdataset opens: a path, ``pipe:``,
        ``http(s):``; brace patterns like ``o365-r000-{000000..000099}.tar`` are expanded).

        Local shards are checked against the manifest through their sidecars: a folder without a
        single sample and a vocabulary that does not fit the shards' labels are refused, and
        shards of 0 samples are left out (a reader given only those would wait forever)."""
        manifest = Manifest.read(folder)
        url_list = Path(folder) / SHARD_URLS
        counts = None
        if url_list.is_file():
            lines = [line.strip() for line in url_list.read_text().splitlines()]
            shards = [url for line in lines if line and not line.startswith("#") for url in braceexpand(line)]
            if not shards:
                raise ShardFormatError(f"{url_list} lists no shard URLs")
        else:
            local = [str(p) for p in list_shards(folder)]
            shards, counts = _check_local_shards(str(folder), local, len(manifest.vocabulary))
        return cls(str(folder), shards, manifest, counts)

    def image_ids(self) -> set[int] | None:
        """The image ids the shards hold (sample keys, from the tar headers of local shards);
        None when the shards are streamed (listing them would read them all)."""
        if not all(Path(s).is_file() for s in self.shards):
            return None
        ids = set()
        for shard in self.shards:
            for key in shard_keys(shard):
                try:
                    ids.add(int(key))
                except ValueError:
                    raise ShardFormatError(
                        f"{shard} holds a sample keyed {key!r}, not an image id; re-extract it"
                    ) from None
        return ids


def _check_local_shards(folder: str, shards: list[str], num_classes: int) -> tuple[list[str], dict | None]:
    """Local shards against their sidecars and the manifest's vocabulary of ``num_classes``.

    Returns the shards that hold samples (all, where a sidecar is missing) and the folder's
    counts (None unless every shard has a sidecar).
    """
    sides = {s: read_sidecar(s) for s in shards}
    fix = "the manifest does not belong to these shards: restore the one written by the extraction, or re-extract"
    for shard, side in sides.items():
        if side is None:
            continue
        if side.get("num_classes", num_classes) != num_classes:
            raise ShardFormatError(
                f"{folder}/{MANIFEST} has a vocabulary of {num_classes} classes but {shard} "
                f"was extracted with one of {side['num_classes']}: {fix}"
            )
        if side.get("max_label", -1) >= num_classes:
            raise ShardFormatError(
                f"{shard} holds class index {side['max_label']}, beyond the {num_classes} classes "
                f"of {folder}/{MANIFEST}: {fix}"
            )
    if any(side is None for side in sides.values()):
        return shards, None
    counts = shard_counts(folder, shards)
    if not all("labelled_boxes" in side for side in sides.values()):
        counts["labelled_boxes"] = None
    if counts["samples"] == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts["skipped_by_reason"].items())) or "none recorded"
        raise ShardFormatError(
            f"the {counts['shards']} shards in {folder} hold no sample: {counts['skipped']} images were skipped at "
            f"extraction ({reasons}). Fix the images and re-extract into an empty folder"
        )
    return [s for s in shards if sides[s]["samples"] > 0], counts
