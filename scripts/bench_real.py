"""`make bench-real`: extraction, training and serving at real size on the best device present, in
one run that keeps to a time budget: the GPU figures of docs/benchmarks.md.

    .venv/bin/python scripts/bench_real.py                         # a GPU: every stage, within --budget-s (540 s)
    .venv/bin/python scripts/bench_real.py --stages fit serve      # some stages only
    .venv/bin/python scripts/bench_real.py --images 4 --steps 4 --workers 0 --batch-sizes 2 --stages extract train
                                                                   # a CPU smoke run (minutes on 2 cores)
    .venv/bin/python scripts/bench_real.py --tiny                  # the tiny backbones: the same code in a minute

SAM ViT-B@1024, SAM 2.1 hiera-b+@1024 and CLIP ViT-L/14@224 with random weights (speed does not
depend on their values), written once under OUT/real/ in the released files' formats (a SAM
``.pth`` state dict, a SAM 2.1 ``{"model": ...}`` checkpoint, a Hugging Face CLIP folder) and loaded
by the package's own code, as a user's would be. The stages, in the order they run
(``benchmarks/real_stages.py``):

- extract: ``FeatureExtractor`` on demo images (640 px, ~8 boxes each) with SAM ViT-B, then SAM 2.1,
  each with CLIP ViT-L/14: the device's two fastest precisions (bf16 and fp16 on a GPU) at each of
  ``--batch-sizes`` (8 16 32 64 on a GPU), then ``--compile`` at the middle one; images/s, boxes/s,
  peak GPU memory, and the share of the device's *measured* matmul rate in that precision reached
  on the FLOPs counted by torch's FlopCounterMode. ``--profile`` (on by default on a GPU): one
  more pass (SAM ViT-B, eager, the middle batch size) under ``torch.profiler``: the top operators
  and kernels (OUT/profile/top_ops.txt), a Chrome trace and the GPU idle fraction (wall time no
  kernel covers, OUT/profile/summary.json).
- segmenters: SAM 2.1 beside SAM ViT-B on the same images and boxes, image by image in turn.
- train: the BL head step (batch 16, ~16 boxes, focal loss, AdamW) on batches in device memory in
  each precision (the ceiling of training), and the shard reader alone with each of ``--workers``.
- fit: ``python -m regionspot_pl.fit``'s own ``train`` (Lightning, the reader, the step) on a
  synthetic cache of ``--cache-gb`` GB of BL samples made for the CLIP ViT-L/14 folder (its text
  embeddings computed by it), ``--fit-seconds`` after warm-up with each of ``--workers``, then
  through Lightning's DDP strategy on one device (NCCL on a GPU) with the fastest of them.
- serve: ``python -m regionspot_pl.serve`` with SAM ViT-B + CLIP ViT-L/14 and a random BL head on
  the device, 16 HTTP clients on 127.0.0.1: LitServe's batching (8) against one request at a time.

Each stage gets a share of ``--budget-s`` (what one leaves goes to the next); a setting that would
start past its stage's share is listed as skipped, and a stage that fails is listed with its error
while the next one runs. After every row the report is rewritten into ``--report`` (default
OUT): bench_real.md (a ``- **Device:**`` line, the command, the table) and bench_real.json (every
raw number).

On a GPU machine without network access whose Python lacks some of the package's dependencies,
``make gpu-wheels`` (here) writes their wheels to ``.whl/``; there:
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=/tmp/site:src python3 scripts/bench_real.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchmarks

from benchmarks import real_stages  # noqa: E402
from benchmarks.common import Table, cpu_name, matmul_gflops, now  # noqa: E402
from benchmarks.real_extract_stage import supported_precisions  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from regionspot_pl.backbones.common import PRECISION_DTYPES  # noqa: E402

STAGES = {
    "extract": real_stages.run_extract,
    "segmenters": real_stages.run_segmenters,
    "train": real_stages.run_train,
    "fit": real_stages.run_fit,
    "serve": real_stages.run_serve,
}
# each stage's share of the budget (what one leaves goes on to the next)
SHARES = {"extract": 0.40, "segmenters": 0.05, "train": 0.07, "fit": 0.30, "serve": 0.18}


class Budget:
    """Deadlines (``time.perf_counter`` values) for the stages in turn, from one budget in seconds."""

    def __init__(self, seconds: float, stages: list[str]) -> None:
        self.end, self.stages = now() + seconds, list(stages)

    def deadline(self, stage: str) -> float:
        """Now plus this stage's share of what is left, the shares of the stages still to run summed to 1."""
        left = self.stages[self.stages.index(stage) :]
        return now() + SHARES[stage] / sum(SHARES[s] for s in left) * max(0.0, self.end - now())


class ReportedTable(Table):
    """A table that rewrites the report after every row: a run stopped from outside (a time limit)
    keeps every row it made."""

    def __init__(self, write: Callable[[Table], object]) -> None:
        super().__init__()
        self.write = write

    def add(self, *args, **kwargs) -> None:
        super().add(*args, **kwargs)
        self.write(self)


def device_facts(device: torch.device, tiny: bool) -> dict:
    """The device, the host's cores, the software, and the measured matmul rate in TFLOP/s of each
    precision the device runs (what every row's share is taken of)."""
    cuda = device.type == "cuda"
    size = 512 if tiny else 8192 if cuda else 2048  # tiny: a check, not a measurement
    return {
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "matmul_size": size,
        "matmul_tflops": {
            p: matmul_gflops(PRECISION_DTYPES[p], device, size) / 1e3 for p in supported_precisions(device)
        },
    }


def write_report(folder: Path, table: Table, facts: dict, args: argparse.Namespace, seconds: float) -> Path:
    """bench_real.json (every raw number) and bench_real.md (the Device line, the command, the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "scripts/bench_real.py", *args.argv])
    date = datetime.date.today().isoformat()
    report = {"date": date, "command": command, "tiny": args.tiny, "seconds": round(seconds, 1), **facts,
              "rows": table.rows}  # fmt: skip
    (folder / "bench_real.json").write_text(json.dumps(report, indent=1, default=str))
    rates = ", ".join(f"{p} {r:.3g} TFLOP/s" for p, r in facts["matmul_tflops"].items())
    cuda = f" (CUDA {facts['cuda']})" if facts["cuda"] else ""
    lines = [
        f"- **Device:** {facts['device']}, {facts['cpu_cores']} CPU cores, torch {facts['torch']}{cuda}; "
        f"measured matmul ({facts['matmul_size']}^3, best of 10): {rates}",
        f"- **Command:** `{command}` ({seconds:.0f} s, {date})",
        "",
        table.render() if table.rows else "(no rows)",
    ]
    (folder / "bench_real.md").write_text("\n".join(lines) + "\n")
    return folder / "bench_real.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="working folder (git-ignored); reused")
    p.add_argument("--report", type=Path, help="folder of bench_real.md and bench_real.json (default: --out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES), help="stages to run, in order")
    p.add_argument("--budget-s", type=float, help="seconds for all stages together (default: 540 on a GPU, no limit)")
    p.add_argument("--images", type=int, help="demo images to extract (default 128; --tiny 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="images per encoder call (default 8 16 32 64; --tiny 2)")
    p.add_argument("--steps", type=int, help="timed head steps per precision (default 200; --tiny 2)")
    p.add_argument("--workers", type=int, nargs="+", help="reader and fit workers to try (default 0 2 4 8; --tiny 0 2)")
    p.add_argument("--cache-gb", type=float, help="synthetic BL cache for train and fit (default 20 GB; --tiny 0.002)")
    p.add_argument("--fit-seconds", type=float, help="timed seconds of each fit run (default 20; --tiny 0.5)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, help="profile one extraction pass "
                   "(default: on a GPU, and with --tiny)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="the tiny random backbones at tiny sizes, matmul rate at 512: "
                   "the same code in a minute on a CPU (a check that the script runs, not a measurement)")  # fmt: skip
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.device(args.device).type == "cuda"
    tiny = args.tiny
    args.budget_s = args.budget_s or (540.0 if cuda else math.inf)
    args.images = args.images or (2 if tiny else 128)
    args.batch_sizes = args.batch_sizes or ([2] if tiny else [8, 16, 32, 64])
    args.steps = args.steps or (2 if tiny else 200)
    args.workers = args.workers or ([0, 2] if tiny else [0, 2, 4, 8])
    args.cache_gb = args.cache_gb or (0.002 if tiny else 20.0)
    args.fit_seconds = args.fit_seconds or (0.5 if tiny else 20.0)
    args.profile = (cuda or tiny) if args.profile is None else args.profile
    return args


def main(argv: list[str] | None = None) -> int:
    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    device, started = torch.device(args.device), now()
    facts = device_facts(device, args.tiny)
    folder = args.report or args.out
    table = ReportedTable(lambda rows: write_report(folder, rows, facts, args, now() - started))
    print(f"[bench-real] {facts['device']}, torch {facts['torch']}, into {args.out}/", flush=True)
    budget, failed = Budget(args.budget_s, args.stages), []
    for stage in args.stages:
        stage_start = now()
        try:
            STAGES[stage](table, args, device, budget.deadline(stage), facts)
        except Exception as err:  # the next stage still runs; the report says what broke
            traceback.print_exc()
            table.add(f"{stage}: failed", f"{type(err).__name__}: {err}"[:300])
            failed.append(stage)
        print(f"[bench-real] {stage}: {now() - stage_start:.0f} s", flush=True)
    report = write_report(folder, table, facts, args, now() - started)
    print(f"\nregionspot_pl bench-real, {facts['device']}, torch {facts['torch']}, {now() - started:.0f} s\n")
    print(f"{table.render()}\n\nwritten: {report} and bench_real.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
