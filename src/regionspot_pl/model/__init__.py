"""The trained part of RegionSpot: head, loss and checkpoints."""

from .checkpoint import CheckpointError, CheckpointNotFoundError, convert_official, load_head, save_head
from .head import VARIANTS, HeadConfig, HeadMismatchError, RegionSpotHead, region_logits
from .loss import region_focal_loss
from .pretrained import load_pretrained, save_pretrained

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "HeadConfig",
    "HeadMismatchError",
    "RegionSpotHead",
    "convert_official",
    "load_head",
    "load_pretrained",
    "region_focal_loss",
    "region_logits",
    "save_head",
    "save_pretrained",
]
