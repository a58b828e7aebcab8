"""The settings of ``python -m regionspot_pl.serve`` (HTTP) and ``python -m regionspot_pl.app`` (a web
page): the model, the network, LitServe's batching and workers, the caches and the request limits.

A light module (no torch model, no LitServe, no Gradio), so that the command line starts without them.
"""

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from ..backbones.common import DEFAULT_TEXT_CACHE, PRECISIONS, resolve_device
from ..errors import RegionSpotError
from ..predict.settings import PredictConfig
from ..utils.checks import Range, check_settings

# The segmenter families and their check are predict's: one list of what --sam_type accepts.
SamType = typing.get_type_hints(PredictConfig, include_extras=True)["sam_type"]
Positive = Annotated[int, Range(1)]


class ServeConfigError(RegionSpotError, ValueError):
    """Server settings that are missing or do not go together."""


@dataclass(frozen=True)
class Limits:
    """The bounds on one request (see :class:`ServeConfig`)."""

    max_pixels: int = 16_777_216
    max_regions: int = 100
    max_points: int = 32
    max_vocabulary: int = 400
    max_name_length: int = 200


@dataclass
class ServeConfig:
    """The settings of ``python -m regionspot_pl.serve`` and ``python -m regionspot_pl.app``."""

    head: str | None = None
    """head file (.pt: fit's head.pt, convert's output) or model folder / Hugging Face Hub id (required)"""
    sam_type: SamType = None
    """SAM backbone (required)"""
    sam_checkpoint: str | None = None
    """SAM checkpoint, e.g. sam_vit_b_01ec64.pth (required)"""
    clip_model: str | None = None
    """local Hugging Face CLIP folder (required)"""
    vocabulary: list[str] = field(default_factory=list)
    """vocabularies loaded at start, NAME=FILE (one class name a line), chosen in a request by vocabulary_id:
    --vocabulary '[lvis=lvis.txt, coco=coco.txt]' (or --vocabulary+ NAME=FILE, repeated)"""
    host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1"
    """address to listen on: 127.0.0.1 this machine only, 0.0.0.0 (or ::) every network"""
    port: Annotated[int, Range(1024, 65535)] = 8000
    """TCP port"""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """cpu, cuda or auto (cuda when there is one); each worker takes one device"""
    devices: Positive = 1
    """devices to serve on (LitServe's devices; the server)"""
    workers_per_device: Positive = 1
    """model copies per device (LitServe's workers_per_device; the server)"""
    precision: Literal[PRECISIONS] = "auto"
    """autocast as in extraction (auto: fp32 on CPU)"""
    text_cache: str = DEFAULT_TEXT_CACHE
    """HDF5 text-embedding cache of the --vocabulary files (a request's own words are never written to it)"""
    max_batch_size: Positive = 8
    """requests of different clients named in one model call (LitServe's max_batch_size; the server)"""
    batch_timeout: Annotated[float, Range(0, 10)] = 0.01
    """seconds to wait for a batch to fill (the server)"""
    request_timeout: Annotated[float, Range(0.1)] = 120.0
    """seconds a request may wait in the queue before it is answered 504 (the server)"""
    max_connections: Positive = 64
    """connections served at once, past which a new one is answered 503 (the server); with
    --max_request_bytes it bounds the memory requests in flight hold"""
    image_cache: Positive = 16
    """images whose features are kept (least recently used dropped first): a new round of prompts on one of them
    runs neither image encoder"""
    text_cache_entries: Positive = 16
    """vocabularies whose text embeddings are kept in memory (least recently used dropped first)"""
    max_request_bytes: Positive = 20_000_000
    """largest request body, refused (413) before it is read further"""
    max_pixels: Positive = Limits.max_pixels
    """largest image, width x height, read from its header and refused (413) before it is decoded"""
    max_regions: Positive = Limits.max_regions
    """most regions (boxes or point groups) a request"""
    max_points: Positive = Limits.max_points
    """most points a region"""
    max_vocabulary: Positive = Limits.max_vocabulary
    """most class names a request gives (each is encoded with 81 prompt templates); a larger vocabulary is
    better loaded at start (--vocabulary), where no limit applies"""
    max_name_length: Positive = Limits.max_name_length
    """longest class name, in characters"""

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        """Required settings and the vocabulary flags' form, before anything is loaded."""
        for name in ("head", "sam_type", "sam_checkpoint", "clip_model"):
            if getattr(self, name) is None:
                raise ServeConfigError(f"--{name} is required (see --help)")
        if self.device != "auto":
            resolve_device(self.device)
        self.vocabulary_files()

    def limits(self) -> Limits:
        """The bounds on one request."""
        return Limits(self.max_pixels, self.max_regions, self.max_points, self.max_vocabulary, self.max_name_length)

    def vocabulary_files(self) -> dict[str, Path]:
        """``--vocabulary NAME=FILE`` -> {NAME: FILE}."""
        files: dict[str, Path] = {}
        for entry in self.vocabulary:
            name, sep, file = entry.partition("=")
            name, file = name.strip(), file.strip()
            if not sep or not name or not file:
                raise ServeConfigError(f"--vocabulary takes NAME=FILE (one class name a line), got {entry!r}")
            if name in files:
                raise ServeConfigError(f"--vocabulary names {name!r} twice; give each vocabulary its own name")
            files[name] = Path(file)
        return files
