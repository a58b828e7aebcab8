"""Evaluation: RegionSpot's scoring rule and box / mask AP through the LVIS API or pycocotools."""

from .metrics import (
    COCO_METRICS,
    LVIS_METRICS,
    EvaluationInputError,
    GroundTruthError,
    ResultsError,
    evaluate_detections,
    format_metrics_table,
)
from .scoring import MAX_DETS_PER_IMAGE, detections_to_results, score_regions

__all__ = [
    "COCO_METRICS",
    "LVIS_METRICS",
    "MAX_DETS_PER_IMAGE",
    "EvaluationInputError",
    "GroundTruthError",
    "ResultsError",
    "detections_to_results",
    "evaluate_detections",
    "format_metrics_table",
    "score_regions",
]

# The CLIP crop baselines of Table 1 (python -m regionspot_pl.test --method clip-box|clip-mask).
from .baselines import BASELINES, box_crops, crop_logits, crop_window  # noqa: E402

__all__ += ["BASELINES", "box_crops", "crop_logits", "crop_window"]
