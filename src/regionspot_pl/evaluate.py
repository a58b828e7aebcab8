"""python -m regionspot_pl.evaluate GT.json RESULTS.json: box / mask AP of a results file.

LVIS ground truth (categories with 'frequency') is scored with the LVIS protocol, anything else
with COCO's; by hotcoco (default, much faster on LVIS val: docs/benchmarks.md) or, with
--metric-backend lvis, by the official libraries (the LVIS API, pycocotools), the reference.
Prints a table in percent. --out DIR writes DIR/metrics.json ({"<iou_type>": {metric: fraction}},
null for metrics with nothing to score) and the report: DIR/report.md, DIR/ap_per_class.png,
DIR/ap_per_class.csv. GT and RESULTS may also be given as --gt and --results (or in --config).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import Command, ConfigError, option, run_command
from .evaluation.inputs import load_ground_truth, load_results
from .evaluation.metrics import BACKENDS, DEFAULT_BACKEND, IOU_TYPES, KINDS, evaluate_results, format_metrics_table
from .evaluation.report import write_metrics, write_report
from .utils.io import OutputError


@dataclass
class EvaluateConfig:
    """The settings of ``python -m regionspot_pl.evaluate``."""

    gt: str | None = option(None, "COCO/LVIS annotation JSON (e.g. lvis_v1_val.json); also the first positional")
    results: str | None = option(None, "detections JSON list in COCO/LVIS results format; also the second positional")
    iou_type: list[str] = option(["bbox"], "bbox, segm, or both (segm needs 'segmentation' RLE in the results)")
    kind: str = option(
        "auto", "evaluator: auto (LVIS when the categories carry 'frequency'), lvis or coco", choices=KINDS
    )
    max_dets: int = option(300, "LVIS: detections kept per image (official 300); COCO: per image and class", minimum=1)
    metric_backend: str = option(
        DEFAULT_BACKEND, "hotcoco (fast) or lvis (the official LVIS API / pycocotools, the reference)", choices=BACKENDS
    )
    out: str | None = option(None, "output folder: metrics.json, report.md, ap_per_class.png and .csv")
    verbose: bool = option(False, "show the libraries' own output")

    def check(self) -> None:
        if self.gt is None or self.results is None:
            raise ConfigError("give the ground truth and the results: GT.json RESULTS.json (or --gt and --results)")
        bad = [t for t in self.iou_type if t not in IOU_TYPES]
        if bad:
            raise ConfigError(f"--iou-type {bad[0]!r} is not one of: {', '.join(IOU_TYPES)}")
        if self.out is not None and Path(self.out).suffix == ".json":
            raise ConfigError(
                f"--out is an output folder (it receives metrics.json and the report), got the "
                f"file name {self.out}: pass a folder, e.g. --out {Path(self.out).with_suffix('')}"
            )


COMMAND = Command(EvaluateConfig, "python -m regionspot_pl.evaluate", __doc__, positionals=("gt", "results"))


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
    ground_truth = load_ground_truth(gt)
    gt_s = time.perf_counter() - start
    dets = load_results(results)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluations = {}
    types = list(dict.fromkeys(iou_types))  # de-duplicated, order kept
    for t in types:
        # The last evaluation may let the official libraries write into the loaded dicts
        # rather than into copies, which saves memory at LVIS val size (docs/benchmarks.md).
        evaluations[t] = evaluate_results(
            ground_truth,
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
        files["metrics"] = write_metrics(out, evaluations)
        sources = {"ground truth": gt, "results": results}
        files.update(write_report(out, evaluations, ground_truth.data, sources, seconds=metric_s))
    return {
        "evaluations": evaluations,
        "files": files,
        "seconds": {"load": load_s, "load_gt": gt_s, "metrics": metric_s},
    }


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


def run(config: EvaluateConfig) -> int:
    """Score the results, print the table and the files written; 0 on success."""
    out = Path(config.out) if config.out is not None else None
    try:
        result = run_evaluate(
            config.gt, config.results, config.iou_type, config.kind, config.max_dets, config.metric_backend, out,
            config.verbose,
        )  # fmt: skip
    except OSError as err:  # e.g. --out not writable, a file not readable; the message names it
        raise OutputError(str(err)) from None
    print(format_metrics_table({t: e.metrics for t, e in result["evaluations"].items()}))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
