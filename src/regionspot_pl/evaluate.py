"""python -m regionspot_pl.evaluate GT.json RESULTS.json: box / mask AP of a results file.

LVIS ground truth (categories with 'frequency') is scored with the LVIS protocol, anything else
with COCO's; by hotcoco (default, much faster on LVIS val: docs/benchmarks.md) or, with
--metric_backend lvis, by the official libraries (the LVIS API, pycocotools), the reference.
Prints a table in percent. --out DIR writes DIR/metrics.json ({"<iou_type>": {metric: fraction}},
null for metrics with nothing to score) and the report: DIR/report.md, DIR/ap_per_class.png,
DIR/ap_per_class.csv. GT and RESULTS may also be given as keys gt and results of a --config
file. Both IoU types: --iou_type [bbox,segm].
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from .config import Command, ConfigError, run_command
from .evaluation.metrics import BACKENDS, DEFAULT_BACKEND, IOU_TYPES, KINDS
from .utils.checks import Range, check_settings


@dataclass
class EvaluateConfig:
    """The settings of ``python -m regionspot_pl.evaluate``."""

    gt: str
    """COCO/LVIS annotation JSON (e.g. lvis_v1_val.json)"""
    results: str
    """detections JSON list in COCO/LVIS results format"""
    iou_type: list[Literal[IOU_TYPES]] = field(default_factory=lambda: ["bbox"])
    """[bbox], [segm] or [bbox,segm] (segm needs 'segmentation' RLE in the results)"""
    kind: Literal[KINDS] = "auto"
    """evaluator: auto (LVIS when the categories carry 'frequency'), lvis or coco"""
    max_dets: Annotated[int, Range(1)] = 300
    """LVIS: detections kept per image (official 300); COCO: per image and class"""
    metric_backend: Literal[BACKENDS] = DEFAULT_BACKEND
    """hotcoco (fast) or lvis (the official LVIS API / pycocotools, the reference)"""
    out: str | None = None
    """output folder: metrics.json, report.md, ap_per_class.png and .csv"""
    verbose: bool = False
    """show the libraries' own output"""

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        if self.out is not None and Path(self.out).suffix == ".json":
            raise ConfigError(
                f"--out is an output folder (it receives metrics.json and the report), got the "
                f"file name {self.out}: pass a folder, e.g. --out {Path(self.out).with_suffix('')}"
            )


COMMAND = Command(EvaluateConfig, "python -m regionspot_pl.evaluate", __doc__)


def run_evaluate(config: EvaluateConfig) -> dict:
    """Load both files once, score each IoU type, write metrics.json and the report into ``config.out``.

    Returns:
        ``{"evaluations": {iou_type: Evaluation}, "files": {name: Path}, "seconds": {"load" (both
        files), "load_gt", "metrics"}}``. Raises EvaluationInputError for input the evaluators
        cannot score.
    """
    from .evaluation.inputs import load_ground_truth, load_results
    from .evaluation.metrics import evaluate_results
    from .evaluation.report import write_metrics, write_report

    start = time.perf_counter()
    ground_truth = load_ground_truth(config.gt)
    gt_s = time.perf_counter() - start
    dets = load_results(config.results)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluations = {}
    types = list(dict.fromkeys(config.iou_type))  # de-duplicated, order kept
    for t in types:
        # The last evaluation may let the official libraries write into the loaded dicts
        # rather than into copies, which saves memory at LVIS val size (docs/benchmarks.md).
        evaluations[t] = evaluate_results(
            ground_truth,
            dets,
            iou_type=t,
            kind=config.kind,
            max_dets=config.max_dets,
            verbose=config.verbose,
            backend=config.metric_backend,
            inputs_owned=t == types[-1],
        )
    metric_s = time.perf_counter() - start
    files: dict[str, Path] = {}
    if config.out is not None:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        files["metrics"] = write_metrics(out, evaluations)
        sources = {"ground truth": config.gt, "results": config.results}
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
    from .evaluation.metrics import format_metrics_table
    from .utils.io import OutputError

    try:
        result = run_evaluate(config)
    except OSError as err:  # e.g. --out not writable, a file not readable; the message names it
        raise OutputError(str(err)) from None
    print(format_metrics_table({t: e.metrics for t, e in result["evaluations"].items()}))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
