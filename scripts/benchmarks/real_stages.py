"""bench-real's stages at real size (``scripts/bench_real.py`` runs them in turn): each adds its rows
to the table and starts no setting past its ``deadline`` (a ``time.perf_counter`` value), listing
it as skipped instead. ``args`` are bench_real's parsed options; ``facts`` its ``device_facts``."""

from __future__ import annotations

import argparse
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

from regionspot_pl.data.records import ImageRecord, load_coco
from regionspot_pl.demo.scenes import generate_demo_dataset

from .bl_shards import bl_batch
from .common import BL, TRAIN_TARGET, Table, counted_gflop, now
from .fit_stage import cache_text_embeddings, fit_rate, synthetic_cache
from .flops_stage import backbone_gflops
from .load_stage import reader_rate
from .real_backbones import backbones_for, tiny_backbones, write_real_backbones
from .real_extract_stage import ExtractSetting, bench_extraction, supported_precisions
from .segmenter_stage import bench_segmenters, segmenter_cases
from .serve_stage import ServedModel, ServeSizes, bench_serving
from .train_stage import bl_head_and_texts, device_step_rate, head_step

GPU_SERVE = ServeSizes(requests=160, rounds=1, prompt_images=16, memory_requests=320, warmup=16)
# --tiny: a few requests of each kind, enough to run every step (both servers, both rounds, the memory run)
TINY_SERVE = ServeSizes(requests=4, rounds=1, prompt_images=1, memory_requests=8, image_cache=2, text_cache_entries=2,
                        warmup=1)  # fmt: skip


def skipped(table: Table, stage: str, deadline: float) -> bool:
    """True (and a row that says so) when ``deadline`` has passed."""
    if now() <= deadline:
        return False
    table.add(stage, "skipped: time budget spent")
    return True


def demo_data(args: argparse.Namespace, image_size: int) -> dict:
    """The demo scenes the stages share: ``args.images`` training images of ``image_size`` px."""
    return generate_demo_dataset(
        args.out / f"demo_{image_size}", num_train=args.images, num_val=14, image_size=image_size, seed=0
    )


def demo_records(data: dict, count: int) -> list[ImageRecord]:
    """The first ``count`` training images of the demo scenes, with their boxes."""
    return sorted(load_coco(data["train_json"])[0], key=lambda r: r.image_id)[:count]


def run_extract(table: Table, args: argparse.Namespace, device: torch.device, deadline: float, facts: dict) -> None:
    """The device's two fastest precisions (``--tiny``: the first) at every batch size, eager, then
    compiled (a GPU) at the middle batch size; SAM ViT-B first (the published pair) with 60% of the
    time, then SAM 2.1 with what is left."""
    cuda = device.type == "cuda"
    precisions = supported_precisions(device)[: 1 if args.tiny else 2]
    settings = [ExtractSetting(p, False, b) for p in precisions for b in args.batch_sizes]
    middle = args.batch_sizes[len(args.batch_sizes) // 2]
    if cuda:  # compiling SAM ViT-B on a 2-core CPU takes longer than the run
        settings += [ExtractSetting(p, True, middle) for p in precisions]
    profiled = ExtractSetting(precisions[0], False, middle) if args.profile else None
    start = now()
    for sam, until in (("sam", start + 0.6 * (deadline - start)), ("sam2", deadline)):
        backbones = backbones_for(args.out, args.tiny, sam)
        data = demo_data(args, backbones.image_size)
        bench_extraction(table, backbones, args.out, device, data, demo_records(data, args.images), settings,
                         profiled if sam == "sam" else None, until)  # fmt: skip


def run_segmenters(table: Table, args: argparse.Namespace, device: torch.device, deadline: float, facts: dict) -> None:
    """SAM 2.1 hiera-b+ beside SAM ViT-B, image by image on the same images and boxes."""
    if skipped(table, f"real segmenter ({device.type})", deadline):
        return
    paths = tiny_backbones(args.out / "tiny") if args.tiny else write_real_backbones(args.out / "real", clip=False)
    data = demo_data(args, 256 if args.tiny else 640)
    bench_segmenters(table, segmenter_cases(paths, args.tiny), demo_records(data, args.images), data["train_images"],
                     device)  # fmt: skip


@cache
def _bl_cache(out: Path, tiny: bool, gigabytes: float) -> Path:
    classes = 8 if tiny else BL["classes"]  # the tiny CLIP on a CPU: 8 names x 81 prompts, not 365 x 81
    clip_dir = backbones_for(out, tiny).clip_dir
    return synthetic_cache(out / "bl_cache", clip_dir, gigabytes, os.cpu_count() or 1, classes)


def bl_cache(args: argparse.Namespace) -> Path:
    """The synthetic cache of ``args.cache_gb`` GB in the CLIP's sizes (written once a run; kept between runs)."""
    return _bl_cache(args.out, args.tiny, args.cache_gb)


def run_train(table: Table, args: argparse.Namespace, device: torch.device, deadline: float, facts: dict) -> None:
    """The BL head step from device memory in each precision (the ceiling of training), then the
    shard reader alone over the synthetic cache with each number of workers."""
    batch, warm_up = (2, 1) if args.tiny else (16, 10)
    gflop = None if args.tiny else head_gflop()  # counting the BL step takes seconds on a CPU
    for precision in supported_precisions(device):
        stage = f"real train ({device.type}): BL head step from device memory, {precision} autocast"
        if skipped(table, stage, deadline):
            continue
        rate = device_step_rate(device, precision, batch, args.steps, warm_up)
        table.add(
            stage, f"{rate:.3g} img/s (batch {batch}; {matmul_share(rate, gflop, facts, precision)})",
            f"{TRAIN_TARGET} img/s (goal)", rate / TRAIN_TARGET, ratio_fmt="{:.3g}x", target=">= 1x (GPU)",
            met=rate >= TRAIN_TARGET if device.type == "cuda" else None, images_per_s=rate, precision=precision,
        )  # fmt: skip
    folder = bl_cache(args)
    samples = 32 if args.tiny else 4096 if device.type == "cuda" else 256
    for workers in args.workers:
        if skipped(table, f"real load: BL shard reader, workers {workers}", deadline):
            continue
        rate, mbps = reader_rate(folder, workers, 16, samples)
        table.add(
            f"real load: BL shard reader, workers {workers}", f"{rate:.0f} samples/s, {mbps:.0f} MB/s",
            f"{TRAIN_TARGET} img/s (goal)", rate / TRAIN_TARGET, target=">= 1x", met=rate >= TRAIN_TARGET,
            samples_per_s=rate, workers=workers,
        )  # fmt: skip


@cache
def head_gflop(batch: int = 16) -> float:
    """GFLOP per image of the BL head's training step (forward, backward), counted on the CPU."""
    head, optimizer, texts = bl_head_and_texts()
    batch_on_cpu = bl_batch(np.random.default_rng(2), batch)
    return counted_gflop(lambda: head_step(head, optimizer, batch_on_cpu, texts)) / batch


def matmul_share(rate: float, gflop_per_item: float | None, facts: dict, precision: str) -> str:
    """``rate`` items/s of ``gflop_per_item`` each as a share of the measured matmul rate in ``precision``."""
    if gflop_per_item is None:
        return "FLOPs not counted"
    return f"{rate * gflop_per_item / 1e3 / facts['matmul_tflops'][precision]:.2%} of {precision} matmul"


def run_fit(table: Table, args: argparse.Namespace, device: torch.device, deadline: float, facts: dict) -> None:
    """``fit``'s own ``train`` from the synthetic cache with each number of workers, then through
    Lightning's DDP strategy on one device with the fastest of them."""
    precision = supported_precisions(device)[0]  # what fit's --trainer.precision auto takes
    batch, warm_up = (2, 2) if args.tiny else (16, 20)
    folder = bl_cache(args)
    cache_text_embeddings(folder, device)
    gflop = None if args.tiny else head_gflop()  # the BL head's; --tiny trains a head of the tiny CLIP's widths
    rates: dict[int, float] = {}
    for run in [*args.workers, "ddp"]:
        ddp = run == "ddp"
        workers = max(rates, key=rates.get, default=0) if ddp else run
        stage = f"fit ({device.type}): from a {args.cache_gb:g} GB cache, batch {batch}, workers {workers}"
        stage += ", DDP on 1 device" if ddp else ""
        if skipped(table, stage, deadline):
            continue
        meter = fit_rate(folder, args.out / "fit", workers, device, args.fit_seconds, "ddp" if ddp else "auto",
                         batch, warm_up)  # fmt: skip
        rate = meter.images_per_s
        if not ddp:
            rates[workers] = rate
        table.add(
            stage, f"{rate:.0f} img/s ({matmul_share(rate, gflop, facts, precision)}; {meter.strategy}, "
            f"backend {meter.backend or '-'})", f"{TRAIN_TARGET} img/s (goal)", rate / TRAIN_TARGET,
            ratio_fmt="{:.3g}x", target=">= 1x", met=rate >= TRAIN_TARGET, images_per_s=rate, workers=workers,
            strategy=meter.strategy, backend=meter.backend, images=meter.images,
            vs_without_ddp=rate / rates[workers] if ddp and workers in rates else None,
        )  # fmt: skip


def run_serve(table: Table, args: argparse.Namespace, device: torch.device, deadline: float, facts: dict) -> None:
    """The server on the device with SAM ViT-B + CLIP ViT-L/14 and a random BL head (``--tiny``:
    the tiny pair and a head of its widths, a few requests), and the share of the matmul rate
    its requests ask for."""
    if skipped(table, f"serve ({device.type})", deadline):
        return
    backbones = backbones_for(args.out, args.tiny)
    model = ServedModel(
        f"{backbones.label}, {device.type}", backbones.sam_type, backbones.sam_checkpoint, backbones.clip_dir,
        head_variant=None if args.tiny else "BL", device=device.type,
    )  # fmt: skip
    result = bench_serving(
        table, args.out, demo_data(args, backbones.image_size), model, TINY_SERVE if args.tiny else GPU_SERVE
    )
    if not args.tiny:  # a request on a new image: both image encoders, then 3 boxes through the decoder
        sam, per_box, clip = backbone_gflops(boxes=3)
        gflop, rate = sam + clip + 3 * per_box, result["rates"]["batched"]["per_s"]
        precision = supported_precisions(device)[0]  # the server's --precision auto
        table.add(
            f"serve ({device.type}): requests on new images at --max_batch_size 8, counted FLOPs",
            f"{rate:.1f} req/s x {gflop:.0f} GFLOP",
            matmul_share(rate, gflop, facts, precision),
        )
