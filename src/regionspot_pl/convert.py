"""python -m regionspot_pl.convert SRC.pth DST: import an official RegionSpot checkpoint's head.

DST ending in .pt or .pth: a head file (our torch format). Any other DST: a model folder with
config.json, model.safetensors and a README.md model card, loadable by path or, once uploaded,
by Hugging Face Hub id. Every --head flag (predict, test, fit --init-from) takes either.
"""

from __future__ import annotations

import argparse
import sys

from .model.checkpoint import CheckpointError, convert_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m regionspot_pl.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="official RegionSpot checkpoint (.pth with key 'model')")
    parser.add_argument("dst", help="head file to write (DST.pt / DST.pth) or model folder to write (any other DST)")
    args = parser.parse_args(argv)
    try:
        variant, path = convert_official(args.src, args.dst)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {variant} head to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
