"""``python -m regionspot_pl.tiny DIR [--seed N]``: write random tiny SAM + CLIP backbones.

For tests and CPU smoke runs of the whole pipeline: give the other commands
``--sam-type tiny --sam-checkpoint DIR/sam_tiny.pth`` and ``DIR/clip_tiny`` as the CLIP directory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .backbones.tiny import write_tiny_backbones


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m regionspot_pl.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", metavar="DIR", help="directory to write sam_tiny.pth and clip_tiny/ into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    args = parser.parse_args(argv)
    paths = write_tiny_backbones(args.out_dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main()
