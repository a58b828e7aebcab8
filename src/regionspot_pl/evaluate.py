"""python -m regionspot_pl.evaluate GT.json RESULTS.json: box / mask AP of a results file.

LVIS ground truth (categories with 'frequency') is scored with the LVIS protocol, anything else
with COCO's; by hotcoco (default, seconds on LVIS val) or, with --metric-backend lvis, by the
official libraries (the LVIS API, pycocotools), the reference. Prints a table in percent.
--out DIR writes DIR/metrics.json ({"<iou_type>": {metric: fraction}}, null for metrics with
nothing to score) and the report: DIR/report.md, DIR/ap_per_class.png, DIR/ap_per_class.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .evaluation.metrics import (
    BACKENDS,
    DEFAULT_BACKEND,
    IOU_TYPES,
    KINDS,
    EvaluationInputError,
    evaluate_results,
    format_metrics_table,
    load_ground_truth,
    load_results,
)
from .evaluation.report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m regionspot_pl.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("gt", help="COCO/LVIS annotation JSON (e.g. lvis_v1_val.json)")
    parser.add_argument("results", help="detections JSON list in COCO/LVIS results format")
    parser.add_argument(
        "--iou-type",
        nargs="+",
        choices=IOU_TYPES,
        default=["bbox"],
        help="bbox, segm, or both (segm needs 'segmentation' RLE in the results)",
    )
    parser.add_argument("--kind", choices=KINDS, default="auto", help="evaluator (default: auto)")
    parser.add_argument(
        "--max-dets",
        type=int,
        default=300,
        help="LVIS: detections kept per image (official 300); COCO: per image and class",
    )
    parser.add_argument(
        "--metric-backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="hotcoco (default, fast) or lvis (the official LVIS API / pycocotools, the reference)",
    )
    parser.add_argument("--out", type=Path, help="output folder: metrics.json, report.md, ap_per_class.png and .csv")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own output")
    return parser


def run_evaluate(
    gt: str,
    results: str,
    iou_types: list[str],
    kind: str = "auto",
    max_dets: int = 300,
    backend: str = DEFAULT_BACKEND,
    out: Path | None = None,
    verbose: bool = False,
) -> dict:
    """Load both files once, score each IoU type, write metrics.json and the report into ``out``.

    Returns:
        ``{"evaluations": {iou_type: Evaluation}, "files": {name: Path}, "seconds": {"load" (both
        files), "load_gt", "metrics"}}``. Raises EvaluationInputError for input the evaluators
        cannot score.
    """
    start = time.perf_counter()
    gt_dict = load_ground_truth(gt)
    gt_s = time.perf_counter() - start
    dets = load_results(results)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluations = {}
    types = list(dict.fromkeys(iou_types))  # de-duplicated, order kept
    for t in types:
        # The last evaluation may let the official libraries write into the loaded dicts
        # rather than into copies: 1.4 GB less at LVIS val size.
        evaluations[t] = evaluate_results(
            gt_dict,
            dets,
            iou_type=t,
            kind=kind,
            max_dets=max_dets,
            verbose=verbose,
            backend=backend,
            inputs_owned=t == types[-1],
        )
    metric_s = time.perf_counter() - start
    files: dict[str, Path] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # NaN is not JSON: metrics with nothing to score are written as null.
        payload = {t: {k: (None if math.isnan(v) else v) for k, v in e.metrics.items()} for t, e in evaluations.items()}
        files["metrics"] = out / "metrics.json"
        files["metrics"].write_text(json.dumps(payload, indent=2) + "\n")
        sources = {"ground truth": gt, "results": results}
        files.update(write_report(out, evaluations, gt_dict, sources, seconds=metric_s))
    return {
        "evaluations": evaluations,
        "files": files,
        "seconds": {"load": load_s, "load_gt": gt_s, "metrics": metric_s},
    }


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_dets < 1:
        parser.error(f"--max-dets must be >= 1, got {args.max_dets}")  # exits with code 2
    if args.out is not None and args.out.suffix == ".json":
        parser.error(
            f"--out is an output folder (it receives metrics.json and the report), got the "
            f"file name {args.out}: pass a folder, e.g. --out {args.out.with_suffix('')}"
        )
    try:
        result = run_evaluate(
            args.gt, args.results, args.iou_type, args.kind, args.max_dets, args.metric_backend, args.out, args.verbose
        )
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable; the message names the file
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_metrics_table({t: e.metrics for t, e in result["evaluations"].items()}))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
