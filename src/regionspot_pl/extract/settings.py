"""The settings of an extraction (``python -m regionspot_pl.extract``, the data presets).

A light module (no CLIP, no Lightning), so that the command line starts without them.
"""

import os
from dataclasses import dataclass
from typing import Annotated, Literal

from ..backbones.build import check_sam_type
from ..backbones.common import DEFAULT_TEXT_CACHE, PRECISIONS
from ..errors import RegionSpotError
from ..utils.checks import Range, check_settings

REQUIRED = ("images", "annotations", "out", "sam_checkpoint", "clip_model")


class ExtractError(RegionSpotError, ValueError):
    """An extraction is misconfigured, found nothing usable, or its folder is taken."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ExtractError(f"${name} is {value!r}, not an integer (torchrun sets it; unset it or fix it)") from None


@dataclass
class ExtractConfig:
    """Everything an extraction run depends on (stored in the manifest)."""

    images: str | None = None
    """folder the annotation file_names are relative to (required)"""
    annotations: str | None = None
    """COCO-format JSON: categories, images, annotations (required)"""
    out: str | None = None
    """output folder for the shards and manifest.json (required)"""
    sam_type: str = "vit_b"
    """the segmenter of sam_checkpoint: vit_b, vit_l, vit_h, tiny (SAM); sam2.1_hiera_t, sam2.1_hiera_s,
    sam2.1_hiera_b+, sam2.1_hiera_l (SAM 2.1); or the path of a SAM 2 model config .yaml"""
    sam_checkpoint: str | None = None
    """SAM .pth or SAM 2 .pt, e.g. sam_vit_b_01ec64.pth, sam2.1_hiera_base_plus.pt (required)"""
    clip_model: str | None = None
    """local Hugging Face folder of the vision-language model, save_pretrained layout (required): CLIP,
    MetaCLIP 2 or SigLIP, told apart by the model_type of its config.json"""
    clip_size: Annotated[int, Range(1)] | None = None
    """input size of the vision-language model (CLIP 224 or 336, SigLIP 224, 256, 384 or 512); must match the model
    (default: the model's own)"""
    boxes: str | None = None
    """proposals to use instead of the ground-truth boxes: COCO results (image_id, bbox xywh, score) or the
    reference's GLIP file"""
    dataset: str | None = None
    """dataset name stored with each sample and in the shard names (default: the annotation file's stem)"""
    shard_size: Annotated[int, Range(1)] = 1000
    """images per shard"""
    device: str = "cpu"
    """cpu, cuda or cuda:N; under torchrun, cuda means cuda:$LOCAL_RANK"""
    batch_size: Annotated[int, Range(1)] = 8
    """images per encoder batch"""
    workers: Annotated[int, Range(0)] = 2
    """image decoding processes (0: decode in the main process)"""
    rank: Annotated[int, Range(0)] | None = None
    """this process's rank (default: $RANK from torchrun, else 0)"""
    world_size: Annotated[int, Range(1)] | None = None
    """number of ranks (default: $WORLD_SIZE from torchrun, else 1)"""
    masks: bool = True
    """store the box-prompted SAM masks: evaluation splits need them for mask AP, training sets do not"""
    precision: Literal[PRECISIONS] = "auto"
    """backbone precision; auto: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU"""
    compile: bool = False
    """torch.compile SAM's mask decoder and both image encoders: a one-off compile at the start, then each
    batch runs fused kernels (speeds in docs/benchmarks.md)"""
    text_cache: str = DEFAULT_TEXT_CACHE
    """HDF5 cache of the vocabulary's CLIP text embeddings (rank 0 writes)"""
    limit: Annotated[int, Range(1)] | None = None
    """only the first N images by id (smoke runs)"""
    read_timeout: Annotated[float, Range(1)] = 600.0
    """seconds without a decoded batch from the image readers before the run fails"""

    # Fields that decide the content of the shards: a rerun into the same --out must agree.
    # (The precision actually used, the backbones' content and the input files' content are
    # checked too, in _check_same_run.)
    CONTENT_FIELDS = ("annotations", "boxes", "sam_type", "clip_size", "dataset", "shard_size", "world_size", "masks",
                      "limit")  # fmt: skip

    def __post_init__(self) -> None:
        """torchrun's environment: $RANK and $WORLD_SIZE where no rank is given, one GPU per process."""
        check_settings(self)
        check_sam_type(self.sam_type)
        if self.rank is None:
            self.rank = _env_int("RANK", 0)
        if self.world_size is None:
            self.world_size = _env_int("WORLD_SIZE", 1)
        if self.device == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = f"cuda:{_env_int('LOCAL_RANK', 0)}"

    def check(self) -> None:
        """Every value's range and choices (again: a field may have been set after the settings were
        made) and the rules between fields."""
        check_settings(self)
        check_sam_type(self.sam_type)
        missing = [f"--{key}" for key in REQUIRED if not getattr(self, key)]
        if missing:
            raise ExtractError(f"missing {', '.join(missing)}: pass them as flags or as keys of a --config file")
        if not 0 <= self.rank < self.world_size:
            raise ExtractError(
                f"--rank {self.rank} is outside --world_size {self.world_size}: ranks are 0..{self.world_size - 1}"
            )
