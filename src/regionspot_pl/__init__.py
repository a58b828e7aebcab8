"""RegionSpot on PyTorch Lightning: open-vocabulary region recognition from cached SAM/CLIP features.

Data flows extract -> cache -> fit -> test; each stage is a module with a thin CLI
(``python -m regionspot_pl.extract|fit|test|evaluate|predict|convert|tiny``). The head and its
checkpoints are :mod:`regionspot_pl.model` (its names are re-exported here), the predictor is
:class:`regionspot_pl.predictor.Predictor` (here too, imported on first use), and every error a
user can cause is a :class:`RegionSpotError`.
"""

from typing import Any

from . import model
from .errors import RegionSpotError
from .model import *  # noqa: F403 (the names of model.__all__)

__all__ = [*model.__all__, "Predictor", "RegionSpotError"]  # noqa: F405 (Predictor: __getattr__)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The predictor pulls in SAM and CLIP code: imported only when asked for.
    if name == "Predictor":
        from .predict.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
