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
