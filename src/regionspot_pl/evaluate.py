"""python -m regionspot_pl.evaluate GT.json RESULTS.json: box / mask AP of a results file.

LVIS ground truth (categories with 'frequency') is scored with the LVIS protocol, anything else
with COCO's; by hotcoco (default, much faster on LVIS val: docs/benchmarks.md) or, with
--metric_backend lvis, by the official libraries (the LVIS API, pycocotools), the reference.
Prints a table in percent. --out DIR writes DIR/metrics.json ({"<iou_type>": {metric: fraction}},
null for metrics with nothing to score) and the report: DIR/report.md, DIR/ap_per_class.png,
DIR/ap_per_class.csv. GT and RESULTS may also be given as keys gt and results of a --config
file. Both IoU types: --iou_type [bbox,segm].

RESULTS may also be the logits file of a test run (`python -m regionspot_pl.test ...
--save_logits true` writes OUT/logits.npz): --scoring then ranks its (box, class) pairs,
regionspot (the reference's rule, the default) or tap (TAP's multi-label rule, the rule of TAP's
published figures), each image keeping --max_dets pairs as test's --topk, and the rule is
printed above the table and kept in metrics.json ("scoring").
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from .config import Command, ConfigError, run_command
from .evaluation.metrics import BACKENDS, DEFAULT_BACKEND, IOU_TYPES, KINDS
from .evaluation.saved_logits import LOGITS_FILE
from .evaluation.scoring import Scoring
from .utils.checks import Range, check_settings


@dataclass
class EvaluateConfig:
    """The settings of ``python -m regionspot_pl.evaluate``."""

    gt: str
    """COCO/LVIS annotation JSON (e.g. lvis_v1_val.json)"""
    results: str
    """detections JSON list in COCO/LVIS results format, or a logits file (.npz) of test --save_logits"""
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
    scoring: Scoring | None = None
    """ranking of a logits file's (box, class) pairs: regionspot (the default) or tap (TAP's multi-label rule)"""

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        if self.out is not None and Path(self.out).suffix == ".json":
            raise ConfigError(
                f"--out is an output folder (it receives metrics.json and the report), got the "
                f"file name {self.out}: pass a folder, e.g. --out {Path(self.out).with_suffix('')}"
            )
        if self.scoring is not None and not is_logits_file(self.results):
            raise ConfigError(
                f"--scoring ranks the (box, class) pairs of a logits file (the {LOGITS_FILE} of `python -m "
                f"regionspot_pl.test ... --save_logits true`), but {self.results} holds detections ranked "
                "already: drop --scoring, or pass the logits file"
            )


def is_logits_file(path: str) -> bool:
    """A test run's logits file (scored here), rather than a detections JSON (scored already)."""
    return Path(path).suffix == ".npz"


COMMAND = Command(EvaluateConfig, "python -m regionspot_pl.evaluate", __doc__)


def run_evaluate(config: EvaluateConfig) -> dict:
    """Load both files once, score each IoU type, write metrics.json and the report into ``config.out``.

    Returns:
        ``{"evaluations": {iou_type: Evaluation}, "files": {name: Path}, "seconds": {"load" (both
        files), "load_gt", "metrics"}, "scoring": the rule that ranked a logits file, None for a
        detections file}``. Raises EvaluationInputError for input the evaluators cannot score.
    """
    from .evaluation.inputs import load_ground_truth
    from .evaluation.metrics import evaluate_results
    from .evaluation.report import write_metrics, write_report
    from .evaluation.scoring import SCORING_NAMES

    start = time.perf_counter()
    ground_truth = load_ground_truth(config.gt)
    gt_s = time.perf_counter() - start
    results_for, scoring = _detections(config)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluations = {}
    types = list(dict.fromkeys(config.iou_type))  # de-duplicated, order kept
    for t in types:
        # The last evaluation may let the official libraries write into the loaded dicts
        # rather than into copies, which saves memory at LVIS val size (docs/benchmarks.md).
        evaluations[t] = evaluate_results(
            ground_truth,
            results_for(t),
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
        files["metrics"] = write_metrics(out, evaluations, scoring=scoring)
        sources = {"ground truth": config.gt, "results": config.results}
        if scoring is not None:
            sources["scoring"] = SCORING_NAMES[scoring]
        files.update(write_report(out, evaluations, ground_truth.data, sources, seconds=metric_s))
    return {
        "evaluations": evaluations,
        "files": files,
        "seconds": {"load": load_s, "load_gt": gt_s, "metrics": metric_s},
        "scoring": scoring,
    }


def _detections(config: EvaluateConfig) -> tuple[Callable[[str], list], str | None]:
    """(the detections to score for an IoU type, the rule that ranked them): a results file's
    own (rule not known: None), or a logits file's (box, class) pairs ranked by ``--scoring``."""
    from .evaluation.inputs import ResultsError, load_results
    from .evaluation.saved_logits import read_logits
    from .evaluation.scoring import image_detections

    if not is_logits_file(config.results):
        dets = load_results(config.results)
        return (lambda _iou_type: dets), None
    saved = read_logits(config.results)
    if "segm" in config.iou_type and not saved.has_masks:
        raise ResultsError(
            f"{config.results} holds no masks (its shards were extracted with --masks false): "
            "evaluate it with --iou_type [bbox]"
        )
    scoring = config.scoring or "regionspot"
    ranked = [image_detections(item, scoring, config.max_dets) for item in saved.images if len(item.boxes)]

    def results_for(iou_type: str) -> list:
        return [r for d in ranked for r in d.results(saved.category_ids, with_masks=iou_type == "segm")]

    return results_for, scoring


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


def run(config: EvaluateConfig) -> int:
    """Score the results, print the table and the files written; 0 on success."""
    from .evaluation.metrics import format_metrics_table
    from .evaluation.scoring import SCORING_NAMES
    from .utils.io import OutputError

    try:
        result = run_evaluate(config)
    except OSError as err:  # e.g. --out not writable, a file not readable; the message names it
        raise OutputError(str(err)) from None
    scoring = result["scoring"] and SCORING_NAMES[result["scoring"]]
    print(format_metrics_table({t: e.metrics for t, e in result["evaluations"].items()}, scoring=scoring))
    for name, path in result["files"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
