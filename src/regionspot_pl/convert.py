"""python -m regionspot_pl.convert SRC.pth DST: import an official RegionSpot checkpoint's head.

DST ending in .pt or .pth: a head file (our torch format). Any other DST: a model folder with
config.json, model.safetensors and a README.md model card, loadable by path or, once uploaded,
by Hugging Face Hub id. Every --head flag (predict, test, fit --init_from) takes either.
SRC and DST may also be given as keys src and dst of a --config file.
"""

import sys
from dataclasses import dataclass

from .config import Command, run_command


@dataclass
class ConvertConfig:
    """The settings of ``python -m regionspot_pl.convert``."""

    src: str
    """official RegionSpot checkpoint (.pth with key 'model')"""
    dst: str
    """head file to write (DST.pt / DST.pth) or model folder to write (any other DST)"""


COMMAND = Command(ConvertConfig, "python -m regionspot_pl.convert", __doc__)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


def run(config: ConvertConfig) -> int:
    """Convert SRC into DST; 0 on success."""
    from .model.checkpoint import CheckpointError, convert_official

    try:
        variant, path = convert_official(config.src, config.dst)
    except OSError as err:  # DST not writable, SRC not readable; the message names the file
        if isinstance(err, CheckpointError):  # a missing SRC: already a RegionSpotError
            raise
        raise CheckpointError(f"cannot convert {config.src} to {config.dst}: {err}") from None
    print(f"wrote {variant} head to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
