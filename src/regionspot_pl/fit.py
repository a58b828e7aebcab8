"""Train the RegionSpot head on cached features.

    python -m regionspot_pl.fit --stage warmup     # the warmup preset: Objects365
    python -m regionspot_pl.fit --stage advanced   # the advanced preset: O365+OI+V3Det, from warm-up
    python -m regionspot_pl.fit --data.train_shards [S] --data.val_shards V --data.val_annotations A
        --trainer.max_steps 1500                  # (one command line)

The defaults are the paper's recipe; a stage's YAML holds only what differs, and flags after it
override both (``--print_config`` shows the result). The head is sized to the shards' CLIP unless
``--model.variant`` names one, and the schedule keeps the paper's shape at any ``--trainer.max_steps``.

Writes OUT/checkpoints/{best,last}.ckpt, Lightning's CSV log OUT/logs/version_N/metrics.csv,
OUT/head.pt (best by val AP if validating, else last) and the same head as a model folder
OUT/head/ (config.json, model.safetensors, README.md model card); ``regionspot_pl.load_head``
and ``python -m regionspot_pl.test --head`` read both.
"""

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .config import Command, preset_names, run_command
from .train.settings import DataConfig, FitConfig, FitError, ModelConfig, OptimConfig, TrainerConfig

__all__ = [
    "COMMAND",
    "DataConfig",
    "FitConfig",
    "FitError",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "main",
    "run",
]

COMMAND = Command(
    FitConfig,
    prog="python -m regionspot_pl.fit",
    description=__doc__,
    preset_flag="--stage",
    preset_kind="fit",
    preset_help="the stage's preset: ./configs/fit/NAME.yaml if there is one, else the shipped NAME "
    f"({', '.join(preset_names('fit'))})",
)


def run(cfg: FitConfig | Mapping, callbacks: Sequence[Any] = ()) -> dict:
    """Train as configured (:func:`regionspot_pl.train.run.train`). ``cfg`` may be a mapping as a
    YAML file holds it, checked as one; ``callbacks`` (Lightning callbacks) join the Trainer's."""
    from .train.run import train

    if isinstance(cfg, Mapping):
        cfg = COMMAND.from_mapping(cfg)
    return train(cfg, callbacks)


def _run_and_report(cfg: FitConfig) -> int:
    result = run(cfg)
    if "head" in result:
        print(f"head ({result['variant']}) written to {result['head']}")
        if result["metrics"]:
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["metrics"].items())))
    return 0


def main(argv: list[str] | None = None) -> int:
    # fit's own stop handling (GracefulStop) goes through Lightning's: no extra signal handlers
    return run_command(COMMAND, argv, _run_and_report, signals=False)


if __name__ == "__main__":
    sys.exit(main())
