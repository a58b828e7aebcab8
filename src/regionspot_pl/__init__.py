"""RegionSpot on PyTorch Lightning: open-vocabulary region recognition from cached SAM/CLIP features.

Data flows extract -> cache -> fit -> test; each stage is a module with a thin CLI
(``python -m regionspot_pl.extract|fit|test|evaluate|predict|convert|tiny``).
"""

from .model import (
    VARIANTS,
    CheckpointError,
    HeadConfig,
    RegionSpotHead,
    convert_official,
    load_head,
    load_pretrained,
    region_focal_loss,
    region_logits,
    save_head,
    save_pretrained,
)

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "HeadConfig",
    "RegionSpotHead",
    "convert_official",
    "load_head",
    "load_pretrained",
    "region_focal_loss",
    "region_logits",
    "save_head",
    "save_pretrained",
]
__version__ = "0.1.0"
