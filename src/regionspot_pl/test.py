"""Zero-shot test of a head (or a CLIP crop baseline) on a cached split: box and mask AP.

    python -m regionspot_pl.test --split lvis_val                       # the lvis_val preset
    python -m regionspot_pl.test --split lvis_val --method clip-mask --out runs/test/lvis_val_clip_mask

Flags override the split's YAML (its keys are the settings below); --print_config prints the
resolved settings as YAML that --config reads back. Boxes come from the shards: GT boxes, or
proposals when the shards were extracted with ``--boxes``; the model only names them. Each
(box, class) pair is scored by the softmax over the vocabulary (times the proposal score for
proposals) and each image keeps its best pairs, at most 300 (LVIS protocol): --scoring
regionspot, the reference's rule. --scoring tap ranks them by TAP's multi-label rule instead
(probability > 0.001, SAM's predicted IoU, per-class NMS), the rule of TAP's published figures.
--save_logits true also writes OUT/logits.npz, which `python -m regionspot_pl.evaluate GT
OUT/logits.npz --scoring tap|regionspot` scores again under either rule.

Writes OUT/detections_bbox.json, OUT/detections_segm.json (the same detections with the SAM mask
of each box; not when the shards were extracted with --masks false), OUT/metrics.json
(``{"bbox": {"AP": ...}, "segm": {...}}``, fractions, null where nothing was there to score) and
the report (report.md, ap_per_class.png/.csv). The library part is
:mod:`regionspot_pl.evaluation.zero_shot`.
"""

import sys

from .config import Command, preset_names, run_command
from .evaluation.settings import DEFAULT_BATCH, METHODS, TestConfig, TestError

__all__ = ["COMMAND", "DEFAULT_BATCH", "METHODS", "TestConfig", "TestError", "main"]


COMMAND = Command(
    TestConfig,
    prog="python -m regionspot_pl.test",
    description=__doc__,
    preset_flag="--split",
    preset_kind="test",
    preset_help="the split's preset: ./configs/test/NAME.yaml if there is one, else the shipped NAME "
    f"({', '.join(preset_names('test'))}); out defaults to runs/test/NAME",
    preset_implies=lambda split: {"out": f"runs/test/{split}"},  # unless the split's YAML names one
)


def _run(config: TestConfig) -> int:
    from .evaluation.metrics import format_metrics_table
    from .evaluation.scoring import SCORING_NAMES
    from .evaluation.zero_shot import run_test

    result = run_test(config)
    print(format_metrics_table(result.metrics, scoring=SCORING_NAMES[result.scoring]))
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, _run, stop_hint="the test did not finish; run it again")


if __name__ == "__main__":
    sys.exit(main())
