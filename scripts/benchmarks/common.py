"""What every stage shares: the table of results, clocks, the CPU, FLOP counting, BL's sizes."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch

# RegionSpot-BL: CLIP ViT-L/14 tokens (257 x 1024), its text width, ~16 boxes per image, O365's classes
BL = {"clip_dim": 1024, "text_dim": 768, "tokens": 257, "boxes": 16, "classes": 365}
# openai/clip-vit-large-patch14's vision tower (transformers' CLIPVisionConfig fields)
CLIP_L14_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14}  # fmt: skip
TRAIN_TARGET = 5000  # images/s: the goal for training from the cache on one GPU (docs/benchmarks.md)
EXTRACT_TARGET = 300  # images/s per GPU: the extraction goal (docs/benchmarks.md)
H100_BF16_SPEC = 989  # TFLOP/s, H100 SXM dense bf16 datasheet figure (a measured matmul rate needs a GPU)


def now() -> float:
    return time.perf_counter()


class Table:
    """Rows of (stage, ours, naive/limit, ratio, target, met?) plus the raw numbers for the JSON."""

    COLUMNS = ("stage", "ours", "naive/limit", "ratio", "target", "met?")

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        stage: str,
        ours: str,
        naive: str = "-",
        ratio: float | None = None,
        ratio_fmt: str = "{:.2f}x",
        target: str = "-",
        met: bool | None = None,
        **raw,
    ) -> None:
        row = {
            "stage": stage,
            "ours": ours,
            "naive/limit": naive,
            "ratio": "-" if ratio is None else ratio_fmt.format(ratio),
            "target": target,
            "met?": "-" if met is None else ("yes" if met else "NO"),
            "raw": raw,
        }
        self.rows.append(row)
        print(f"[bench] {stage}: {ours} | {naive} | {row['ratio']} | {target} {row['met?']}", flush=True)

    def render(self) -> str:
        """The rows as a Markdown table (docs/benchmarks.md holds such a table)."""
        width = {c: max(len(c), *(len(r[c]) for r in self.rows)) for c in self.COLUMNS}
        line = "| " + " | ".join(c.ljust(width[c]) for c in self.COLUMNS) + " |"
        sep = "|" + "|".join("-" * (width[c] + 2) for c in self.COLUMNS) + "|"
        body = ["| " + " | ".join(r[c].ljust(width[c]) for c in self.COLUMNS) + " |" for r in self.rows]
        return "\n".join([line, sep, *body])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", n: int = 2048) -> float:
    """The device's measured dense matmul rate in GFLOP/s (best of 10): the arithmetic limit."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = math.inf
    for _ in range(10):
        sync(device)
        start = now()
        a @ b
        sync(device)
        best = min(best, now() - start)
    return 2 * n**3 / best / 1e9


def counted_gflop(fn) -> float:
    """GFLOP of the matmuls and convolutions ``fn()`` runs (2 per multiply-add), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9
