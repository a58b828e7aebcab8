"""The trained part of RegionSpot: head, loss and checkpoints.

Imports go one way: ``errors`` and ``card`` <- ``pretrained`` (the folder format, the head's
Hugging Face mixin) <- ``head`` <- ``checkpoint`` (``.pt`` files, the official checkpoints, and
``load_head`` for either kind).
"""

from .checkpoint import convert_official, load_head, load_pretrained, save_head
from .errors import CheckpointError, CheckpointNotFoundError
from .head import VARIANTS, HeadConfig, HeadMismatchError, RegionSpotHead, region_logits
from .loss import region_focal_loss
from .pretrained import save_pretrained

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
