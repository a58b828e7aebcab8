"""python -m regionspot_pl.convert SRC.pth DST: import an official RegionSpot checkpoint's head.

DST ending in .pt or .pth: a head file (our torch format). Any other DST: a model folder with
config.json, model.safetensors and a README.md model card, loadable by path or, once uploaded,
by Hugging Face Hub id. Every --head flag (predict, test, fit --init-from) takes either.
SRC and DST may also be given as --src and --dst (or in --config).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .cli import Command, ConfigError, option, run_command
from .model.checkpoint import CheckpointError, convert_official


@dataclass
class ConvertConfig:
    """The settings of ``python -m regionspot_pl.convert``."""

    src: str | None = option(None, "official RegionSpot checkpoint (.pth with key 'model'); also the first positional")
    dst: str | None = option(
        None,
        "head file to write (DST.pt / DST.pth) or model folder to write (any other DST); also the second positional",
    )

    def check(self) -> None:
        if self.src is None or self.dst is None:
            raise ConfigError("give the checkpoint to convert and where to write it: SRC.pth DST (or --src and --dst)")


COMMAND = Command(ConvertConfig, "python -m regionspot_pl.convert", __doc__, positionals=("src", "dst"))


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


def run(config: ConvertConfig) -> int:
    """Convert SRC into DST; 0 on success."""
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
