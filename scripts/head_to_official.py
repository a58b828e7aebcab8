"""Write a head in the official RegionSpot checkpoint layout: ``{"model": {"model.<key>": tensor}}``.

    python scripts/head_to_official.py HEAD OUT.pth

The inverse of ``python -m regionspot_pl.convert`` for the head: the reference code loads such a
file with its ``pretrain_ckpt`` (``strict=False``: SAM and CLIP come from their own files), and
``convert`` reads it back to the same head. docs/reproduce.md uses it for a dry run of the
release-table commands on the demo's tiny backbones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from regionspot_pl.model.checkpoint import CheckpointError, load_head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/head_to_official.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("head", help="a head file or model folder (fit's head.pt, convert's output)")
    parser.add_argument("out", help="the .pth file to write")
    args = parser.parse_args(argv)
    try:
        head = load_head(args.head)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"model.{k}": v.detach().cpu() for k, v in head.state_dict().items()}}, out)
    print(f"wrote {out} ({len(head.state_dict())} head tensors in the official layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
