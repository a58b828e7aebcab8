"""python -m regionspot_pl.convert SRC.pth DST: import an official RegionSpot checkpoint's head."""

from __future__ import annotations

import argparse
import sys

from .model.checkpoint import CheckpointError, convert_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regionspot_pl.convert", description=__doc__)
    parser.add_argument("src", help="official RegionSpot checkpoint (.pth with key 'model')")
    parser.add_argument("dst", help="where to write the regionspot_pl head checkpoint")
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
