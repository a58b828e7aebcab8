"""python -m regionspot_pl.evaluate GT.json RESULTS.json: box / mask AP of a results file.

LVIS ground truth (categories with 'frequency') is scored with the LVIS API, anything else with
pycocotools. Prints a table in percent; --out writes {"<iou_type>": {metric: fraction}} as JSON,
with null for metrics that have nothing to score.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .evaluation.metrics import (
    IOU_TYPES,
    KINDS,
    EvaluationInputError,
    evaluate_detections,
    format_metrics_table,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regionspot_pl.evaluate", description=__doc__)
    parser.add_argument("gt", help="COCO/LVIS annotation JSON (e.g. lvis_v1_val.json)")
    parser.add_argument("results", help="detections JSON list in COCO/LVIS results format")
    parser.add_argument(
        "--iou-type", nargs="+", choices=IOU_TYPES, default=["bbox"],
        help="bbox, segm, or both (segm needs 'segmentation' RLE in the results)",
    )
    parser.add_argument("--kind", choices=KINDS, default="auto", help="evaluator (default: auto)")
    parser.add_argument(
        "--max-dets", type=int, default=300,
        help="LVIS: detections kept per image (official 300); COCO: per image and class",
    )
    parser.add_argument("--out", type=Path, help="write the metrics here as JSON")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own output")
    args = parser.parse_args(argv)
    if args.max_dets < 1:
        parser.error(f"--max-dets must be >= 1, got {args.max_dets}")  # exits with code 2

    metrics: dict[str, dict[str, float]] = {}
    try:
        for iou_type in dict.fromkeys(args.iou_type):  # de-duplicated, order kept
            metrics[iou_type] = evaluate_detections(
                args.gt, args.results, iou_type=iou_type, kind=args.kind,
                max_dets=args.max_dets, verbose=args.verbose,
            )
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_metrics_table(metrics))
    if args.out is not None:
        # NaN is not JSON: metrics with nothing to score are written as null.
        payload = {
            t: {k: (None if math.isnan(v) else v) for k, v in m.items()} for t, m in metrics.items()
        }
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as err:
            print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
