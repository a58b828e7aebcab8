"""``python -m regionspot_pl.tiny DIR [--seed N]``: write random tiny SAM + CLIP backbones (and
tiny SigLIP and MetaCLIP 2 folders).

For tests and CPU smoke runs of the whole pipeline: give the other commands
``--sam_type tiny --sam_checkpoint DIR/sam_tiny.pth`` and ``DIR/clip_tiny`` as the CLIP directory
(or ``DIR/siglip_tiny``, ``DIR/metaclip2_tiny`` as ``--clip_model``; for SAM 2.1,
``--sam_type DIR/sam2.1_hiera_tiny_random.yaml --sam_checkpoint DIR/sam2.1_hiera_tiny_random.pt``).
"""

import sys
from dataclasses import dataclass

from .config import Command, run_command


@dataclass
class TinyConfig:
    """The settings of ``python -m regionspot_pl.tiny``."""

    out_dir: str
    """directory to write sam_tiny.pth, clip_tiny/, siglip_tiny/ and metaclip2_tiny/ into"""
    seed: int = 0
    """random seed (same seed, same bytes)"""


COMMAND = Command(TinyConfig, "python -m regionspot_pl.tiny", __doc__)


def run(config: TinyConfig) -> int:
    """Write the backbones; print their paths ('name: path' lines)."""
    from .backbones.tiny import write_tiny_backbones

    for name, path in write_tiny_backbones(config.out_dir, seed=config.seed).items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main())
