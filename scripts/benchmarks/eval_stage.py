"""Evaluation: ``regionspot_logits`` over cached splits, batched against one image at a time, and
the LVIS metric step (scripts/bench_metrics.py), hotcoco against the LVIS API, each as
``python -m regionspot_pl.evaluate GT RESULTS`` runs it, in a process of its own."""

from __future__ import annotations

from pathlib import Path

import bench_metrics
import torch

from regionspot_pl.cache.manifest import Manifest
from regionspot_pl.cache.shards import list_shards
from regionspot_pl.evaluation.logits import regionspot_logits
from regionspot_pl.model import RegionSpotHead

from .common import BL, Table, now

LVIS_IMAGES = bench_metrics.LVIS_VAL["images"]
CPU = torch.device("cpu")


def _timed(head: RegionSpotHead, shard: str, texts: torch.Tensor, batch_size: int) -> tuple[int, float]:
    """(images, seconds) of one pass over one shard at this batch size."""
    start = now()
    images = sum(1 for _ in regionspot_logits(head, [shard], texts, CPU, batch_size))
    return images, now() - start


def eval_pair(head: RegionSpotHead, shards: list[str], texts: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(images/s at batch 16, at batch 1), the two alternating shard by shard, after a warm-up pass
    over the first shard (so that neither pays for the first call)."""
    _timed(head, shards[0], texts, 16)
    images, t16, t1 = 0, 0.0, 0.0
    for _ in range(repeat):
        for shard in shards:
            count, seconds = _timed(head, shard, texts, 16)
            images, t16 = images + count, t16 + seconds
            t1 += _timed(head, shard, texts, 1)[1]
    return images / t16, images / t1


def _eval_row(table: Table, name: str, head: RegionSpotHead, folder: Path, texts: torch.Tensor, repeat: int) -> float:
    """One table row: the batched head pass over a shard folder against one image at a time."""
    b16, b1 = eval_pair(head, [str(s) for s in list_shards(folder)], texts, repeat)
    fmt = "{:.0f}" if b16 >= 100 else "{:.1f}"
    extra = {"lvis_val_head_s": LVIS_IMAGES / b16}
    table.add(name, f"{fmt.format(b16)} img/s (batch 16)", f"{fmt.format(b1)} img/s (batch 1)", b16 / b1,
              images_per_s=b16, batch1_images_per_s=b1, **extra)  # fmt: skip
    return b16


def bench_evaluation(table: Table, val_folder: Path, bl_eval: Path, repeat: int = 3) -> dict:
    """The batched head pass on the demo val shards (tiny CLIP) and on BL-size shards."""
    torch.manual_seed(0)
    manifest = Manifest.read(val_folder)
    head = RegionSpotHead(clip_dim=manifest.clip.vision_dim, text_dim=manifest.clip.text_dim).eval()
    texts = torch.randn(len(manifest.vocabulary), manifest.clip.text_dim)
    name = f"eval: regionspot_logits, demo val shards (tiny CLIP, D {manifest.clip.vision_dim})"
    demo = _eval_row(table, name, head, val_folder, texts, repeat)
    bl_head = RegionSpotHead.from_variant("BL").eval()
    bl_texts = torch.randn(BL["classes"], BL["text_dim"])
    name = "eval: regionspot_logits, BL-size shards (T 257, D 1024, ~16 boxes)"
    bl = _eval_row(table, name, bl_head, bl_eval, bl_texts, max(1, repeat - 1))
    return {"demo": demo, "bl": bl, "lvis_head_s": LVIS_IMAGES / bl}


def bench_metric_step(table: Table, folder: Path, scale: float) -> dict:
    """The LVIS metric step (bbox), hotcoco against the LVIS API, at ``scale`` x LVIS v1 val.

    Each backend runs in a fresh process, as ``python -m regionspot_pl.evaluate`` does
    (scripts/bench_metrics.py): the rows give its wall time and the part spent in the evaluator.
    """
    report = bench_metrics.bench(scale, ["bbox"], list(bench_metrics.BACKENDS), folder)
    if report["failed"]:
        table.add(
            "eval: LVIS metric step, hotcoco vs LVIS API", "failed: " + "; ".join(report["failed"])[-200:], **report
        )
        return report
    fast, ref = report["runs"]["hotcoco"], report["runs"]["lvis"]
    size = f"{report['images']} img, {report['detections'] / 1e6:.1f}M dets"
    diff = report["largest_difference"]["bbox"]
    full = report["images"] == LVIS_IMAGES  # the target is for LVIS val's size
    table.add(
        f"eval: `evaluate GT RESULTS` (LVIS bbox, {size}), hotcoco vs LVIS API",
        f"{fast['wall_s']:.1f} s",
        f"{ref['wall_s']:.1f} s",
        report["speedup"]["wall"],
        ratio_fmt="{:.1f}x",
        target=">= 10x at full size",
        met=report["speedup"]["wall"] >= 10 if full else None,
        **report,
    )
    table.add(
        f"eval: LVIS metric step alone (validation + evaluator, {size}), hotcoco vs LVIS API",
        f"{fast['metric_s']:.1f} s",
        f"{ref['metric_s']:.1f} s",
        report["speedup"]["metric_step"],
        ratio_fmt="{:.1f}x",
        target="equal to 1e-6",
        met=max(diff.values()) <= 1e-6,
        largest_difference=diff,
    )
    return report
