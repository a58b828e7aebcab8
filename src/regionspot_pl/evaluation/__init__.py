"""Evaluation: the scoring rules (the reference's, TAP's) and box / mask AP through hotcoco, the
LVIS API or pycocotools.

``metrics`` (the public face) <- ``inputs`` (ground truth and detections, checked) and
``backends`` (the libraries); ``scoring`` (logits -> ranked detections -> results; ``saved_logits``
the logits file of ``test --save_logits``), ``report``,
``baselines`` and ``zero_shot`` (the test run) use them.
"""

from typing import Any

from .inputs import EvaluationInputError, GroundTruthError, ResultsError
from .metrics import COCO_METRICS, LVIS_METRICS, evaluate_detections, format_metrics_table
from .scoring import MAX_DETS_PER_IMAGE, SCORINGS, detections_to_results, score_regions, score_regions_tap

__all__ = [
    "COCO_METRICS",
    "LVIS_METRICS",
    "MAX_DETS_PER_IMAGE",
    "SCORINGS",
    "EvaluationInputError",
    "GroundTruthError",
    "ResultsError",
    "detections_to_results",
    "evaluate_detections",
    "format_metrics_table",
    "score_regions",
    "score_regions_tap",
]

# The CLIP crop baselines of Table 1 (python -m regionspot_pl.test --method clip-box|clip-mask):
# imported on first use, as they bring in CLIP (transformers), which scoring a results file
# (python -m regionspot_pl.evaluate) does not need.
_BASELINE_NAMES = ("BASELINES", "box_crops", "crop_logits", "crop_window")
__all__ += list(_BASELINE_NAMES)


def __getattr__(name: str) -> Any:
    if name in _BASELINE_NAMES:
        from . import baselines

        return getattr(baselines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
