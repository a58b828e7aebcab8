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


def eval_rate(head: RegionSpotHead, shards: list[str], texts: torch.Tensor, batch_size: int, repeat: int) -> float:
    images, start = 0, now()
    for _ in range(repeat):
        for _ in regionspot_logits(head, shards, texts, CPU, batch_size):
            images += 1
    return images / (now() - start)


def eval_pair(head: RegionSpotHead, shards: list[str], texts: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(images/s at batch 16, at batch 1), the two alternating shard by shard."""
    t16 = t1 = 0.0
    images = 0
    for _ in range(repeat):
        for shard in shards:
            start = now()
            images += sum(1 for _ in regionspot_logits(head, [shard], texts, CPU, 16))
            t16 += now() - start
            start = now()
            sum(1 for _ in regionspot_logits(head, [shard], texts, CPU, 1))
            t1 += now() - start
    return images / t16, images / t1


def bench_evaluation(table: Table, val_folder: Path, bl_eval: Path, repeat: int = 3) -> dict:
    """The batched head pass on the demo val shards (tiny CLIP) and on BL-size shards."""
    torch.manual_seed(0)
    manifest = Manifest.read(val_folder)
    head = RegionSpotHead(clip_dim=manifest.clip.vision_dim, text_dim=manifest.clip.text_dim).eval()
    texts = torch.randn(len(manifest.vocabulary), manifest.clip.text_dim)
    shards = [str(s) for s in list_shards(val_folder)]
    eval_rate(head, shards, texts, 16, 1)  # warm-up
    demo_b16, demo_b1 = eval_pair(head, shards, texts, repeat)
    table.add(
        f"eval: regionspot_logits, demo val shards (tiny CLIP, D {manifest.clip.vision_dim})",
        f"{demo_b16:.0f} img/s (batch 16)",
        f"{demo_b1:.0f} img/s (batch 1)",
        demo_b16 / demo_b1,
        images_per_s=demo_b16,
        batch1_images_per_s=demo_b1,
    )
    bl_head = RegionSpotHead.from_variant("BL").eval()
    bl_texts = torch.randn(BL["classes"], BL["text_dim"])
    bl_shards = [str(s) for s in list_shards(bl_eval)]
    eval_rate(bl_head, bl_shards[:1], bl_texts, 16, 1)  # warm-up
    bl_b16, bl_b1 = eval_pair(bl_head, bl_shards, bl_texts, max(1, repeat - 1))
    table.add(
        "eval: regionspot_logits, BL-size shards (T 257, D 1024, ~16 boxes)",
        f"{bl_b16:.1f} img/s (batch 16)",
        f"{bl_b1:.1f} img/s (batch 1)",
        bl_b16 / bl_b1,
        images_per_s=bl_b16,
        batch1_images_per_s=bl_b1,
        lvis_val_head_s=LVIS_IMAGES / bl_b16,
    )
    return {"demo": demo_b16, "bl": bl_b16, "lvis_head_s": LVIS_IMAGES / bl_b16}


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
