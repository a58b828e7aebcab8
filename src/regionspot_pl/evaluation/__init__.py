"""Evaluation: RegionSpot's scoring rule and box / mask AP through hotcoco, the LVIS API or pycocotools.

``metrics`` (the public face) <- ``inputs`` (ground truth and detections, checked) and
``backends`` (the libraries); ``scoring`` (logits -> ranked detections -> results), ``report``,
``baselines`` and ``zero_shot`` (the test run) use them.
"""

from .inputs import EvaluationInputError, GroundTruthError, ResultsError
from .metrics import COCO_METRICS, LVIS_METRICS, evaluate_detections, format_metrics_table
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
