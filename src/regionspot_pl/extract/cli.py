"""Offline extraction: frozen SAM + CLIP features of a dataset into WebDataset shards.

    python -m regionspot_pl.extract --preset o365               # the o365 data preset
    python -m regionspot_pl.extract --config my_o365.yaml       # settings from your YAML
    python -m regionspot_pl.extract --images DIR --annotations FILE --out DIR --sam_type vit_b
        --sam_checkpoint sam_vit_b_01ec64.pth --clip_model DIR  # or as flags

Flags after a preset or --config override it; --print_config shows the resolved settings as
YAML (edit the paths of a preset in a copy: --preset o365 --print_config > my_o365.yaml).

Each rank takes every ``world_size``-th image (sorted by id) and groups its images into shards
of ``shard_size``, in order: a rerun skips the shards that exist and rewrites the rest
identically, so a run killed at any moment loses nothing finished and never duplicates a sample.
"""

import logging

from ..config import Command, preset_names, run_command
from .settings import ExtractConfig

PROG = "python -m regionspot_pl.extract"
STOP_HINT = "the finished shards are kept; run the same command again to continue"

COMMAND = Command(
    ExtractConfig,
    PROG,
    __doc__,
    preset_flag="--preset",
    preset_kind="data",
    preset_help="a dataset's preset: ./configs/data/NAME.yaml if there is one, else the shipped NAME "
    f"({', '.join(preset_names('data'))}; override its paths with flags, or edit a copy)",
)


def _run(cfg: ExtractConfig) -> int:
    from .run import format_summary, run_extraction

    print(format_summary(run_extraction(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: bad input is one ``error:`` line and exit 2; SIGTERM/SIGINT stop it with the
    finished shards kept (exit 128 + the signal number)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(COMMAND, argv, _run, stop_hint=STOP_HINT)
