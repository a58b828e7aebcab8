"""The settings of a zero-shot test: ``python -m regionspot_pl.test`` and
:func:`regionspot_pl.evaluation.zero_shot.run_test`.

A light module (no CLIP, no Lightning), so that the command line starts without them.
"""

import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from ..errors import RegionSpotError
from ..utils.checks import Range, check_settings
from .metrics import BACKENDS, DEFAULT_BACKEND
from .scoring import MAX_DETS_PER_IMAGE, SCORINGS, Scoring

__all__ = ["DEFAULT_BATCH", "METHODS", "SCORINGS", "Method", "Scoring", "TestConfig", "TestError"]

# regionspot, or a CLIP crop baseline of Table 1 (evaluation.baselines.BASELINES)
Method = Literal["regionspot", "clip-box", "clip-mask"]
METHODS: tuple[str, ...] = typing.get_args(Method)
# What batch_size counts when it is not given: images per head batch (regionspot), box crops
# per CLIP image-tower batch (the baselines).
DEFAULT_BATCH = {"regionspot": 16, "clip-box": 128, "clip-mask": 128}


class TestError(RegionSpotError, ValueError):
    """A test run is misconfigured: missing inputs, or parts that do not fit together."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass
class TestConfig:
    """Settings of a zero-shot test (the keys of the test presets and of --config)."""

    __test__ = False

    shards: str | None = None
    """shard folder of the split (python -m regionspot_pl.extract --out)"""
    annotations: str | None = None
    """GT of the split (LVIS/COCO JSON): categories, and the AP reference"""
    head: str | None = None
    """head checkpoint (fit's head.pt, or convert's output); regionspot only"""
    clip_model: str | None = None
    """CLIP folder for the text side (default: the one the shards' manifest names)"""
    vocab: str | None = None
    """class names, one a line, in category-id order (default: the annotations')"""
    method: Method = "regionspot"
    """regionspot, or a CLIP crop baseline of Table 1"""
    topk: Annotated[int, Range(1)] = MAX_DETS_PER_IMAGE
    """detections kept per image (LVIS scores at most 300)"""
    scoring: Scoring = "regionspot"
    """ranking of (box, class) pairs: regionspot (the reference's rule) or tap (TAP's multi-label rule)"""
    save_logits: bool = False
    """also write OUT/logits.npz (boxes, IoUs, logits: 4.8 KB a box at 1,203 classes) for evaluate --scoring"""
    out: str | None = None
    """output folder (default: runs/test/SPLIT, or runs/test/DATASET of the shards)"""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N"""
    images: str | None = None
    """original images, for the crop baselines (default: the shards' manifest's)"""
    batch_size: Annotated[int, Range(1)] | None = None
    """images per head batch (regionspot) or crops per CLIP batch (baselines); null: 16, or 128 for the baselines"""
    text_cache: str | None = None
    """HDF5 text-embedding cache (default: the one the shards' manifest names)"""
    workers: Annotated[int, Range(0)] = 2
    """image decoding workers for the crop baselines"""
    metric_backend: Literal[BACKENDS] = DEFAULT_BACKEND
    """hotcoco, or lvis (the official LVIS API / pycocotools, the reference)"""

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        """The inputs every run needs (after the command line is read, and by run_test)."""
        needed = ["shards", "annotations"] + (["head"] if self.method == "regionspot" else [])
        for key in needed:
            if not getattr(self, key):
                raise TestError(f"no {key} given: pass --{key} or set '{key}' in the config")

    def batch(self) -> int:
        """batch_size, or the method's default (``DEFAULT_BATCH``)."""
        return DEFAULT_BATCH[self.method] if self.batch_size is None else self.batch_size
