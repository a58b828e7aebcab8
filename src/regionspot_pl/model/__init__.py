"""The trained part of RegionSpot: head, loss and checkpoints."""

from .checkpoint import CheckpointError, convert_official, load_head, save_head
from .head import VARIANTS, HeadConfig, RegionSpotHead, region_logits
from .loss import region_focal_loss

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "HeadConfig",
    "RegionSpotHead",
    "convert_official",
    "load_head",
    "region_focal_loss",
    "region_logits",
    "save_head",
]
