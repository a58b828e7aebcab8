"""`make bench-real`: extraction and training at real size on the best device present.

    .venv/bin/python scripts/bench_real.py                 # GPU: defaults (64 images, 50 head steps)
    .venv/bin/python scripts/bench_real.py --images 2 --steps 3 --workers 0   # CPU smoke run (~5 min on 2 cores)
    .venv/bin/python scripts/bench_real.py --tiny          # the tiny backbones instead: the same code in seconds
    .venv/bin/python scripts/bench_real.py --stages segmenters --images 2   # SAM 2.1 beside SAM only

SAM ViT-B (1024 input) and CLIP ViT-L/14 (224) with random weights (speed does not depend on
their values), written once under bench_out/real/ in the real files' formats (a SAM ``.pth`` state
dict, a Hugging Face CLIP folder) and loaded by the package's own code, as a user's would be.

- extraction: ``FeatureExtractor`` on demo images at 640 px with their boxes, for each precision
  the device supports (fp32, bf16, fp16) with and without ``--compile``; images/s, boxes/s, peak
  GPU memory, and the fraction of the device's *measured* matmul rate in that dtype achieved on the
  FLOPs counted by torch's FlopCounterMode (SAM encoder + CLIP + the decoder for each box).
- segmenters (``benchmarks/segmenter_stage.py``): SAM 2.1 hiera-b+ (random weights, built from
  sam2's packaged config) beside SAM ViT-B on the same images and boxes, image by image in turn:
  image-encoder ms per image, prompt + mask decoder ms per box.
- training: the RegionSpot-BL head step (batch 16, ~16 boxes, focal loss, AdamW) from batches in
  device memory under autocast, and the shard reader (``RegionDataModule``) with 0..N workers,
  against the goal of 5,000 images/s.
- ``--profile``: one more extraction pass under ``torch.profiler``; writes the top operators and
  kernels (``profile/top_ops.txt``), a Chrome trace (``profile/trace.json``) and the GPU idle
  fraction (wall time not covered by any kernel, ``profile/summary.json``) to the output folder.

On a GPU machine whose Python lacks some of our dependencies: download their wheels into an
ignored ``.whl/`` (segment-anything, webdataset, braceexpand, pycocotools, lvis) and run
``pip install --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src python3 scripts/bench_real.py``.
Prints one table; writes bench_out/bench_real.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchmarks

from benchmarks.bl_shards import bl_batch, write_bl_shards  # noqa: E402
from benchmarks.common import BL, TRAIN_TARGET, Table, counted_gflop, cpu_name, matmul_gflops, now, sync  # noqa: E402
from benchmarks.flops_stage import backbone_gflops  # noqa: E402
from benchmarks.load_stage import reader_rate  # noqa: E402
from benchmarks.segmenter_stage import bench_segmenters, segmenter_cases  # noqa: E402
from benchmarks.train_stage import head_step  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from regionspot_pl.backbones.common import PRECISION_DTYPES, autocast_for, resolved_precision  # noqa: E402
from regionspot_pl.backbones.sam import OFFICIAL_SAM_CHECKPOINTS  # noqa: E402
from regionspot_pl.backbones.tiny import tiny_clip_tokenizer, write_tiny_backbones  # noqa: E402
from regionspot_pl.data.records import load_coco  # noqa: E402
from regionspot_pl.demo.scenes import generate_demo_dataset  # noqa: E402
from regionspot_pl.extract.features import FeatureExtractor, ImageFeaturesInput  # noqa: E402
from regionspot_pl.extract.run import ExtractConfig, load_extractor  # noqa: E402
from regionspot_pl.model import RegionSpotHead  # noqa: E402
from regionspot_pl.utils.io import AtomicFile  # noqa: E402

# extraction, the segmenter pair (SAM 2.1 beside SAM), head training + shard reading
STAGES = ("extract", "segmenters", "train")


def write_real_backbones(folder: Path, clip: bool = True) -> dict[str, Path]:
    """Random SAM ViT-B and CLIP ViT-L/14 (``clip``; 1.7 GB) in the official files' formats (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    sam_path, clip_dir = folder / OFFICIAL_SAM_CHECKPOINTS["vit_b"], folder / "clip-vit-large-patch14"
    if not sam_path.is_file():
        torch.manual_seed(0)
        state = sam_model_registry["vit_b"](checkpoint=None).state_dict()
        with AtomicFile(sam_path) as tmp:
            torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    if clip and not (clip_dir / "config.json").is_file():
        tokenizer = tiny_clip_tokenizer()  # a real CLIPTokenizer; the vocabulary does not change speed
        config = CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "max_position_embeddings": 77,
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "pad_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
            },
            projection_dim=768,
        )
        torch.manual_seed(1)
        CLIPModel(config).save_pretrained(clip_dir)
        tokenizer.save_pretrained(clip_dir)
    return {"sam_checkpoint": sam_path, "clip_dir": clip_dir}


def supported_precisions(device: torch.device) -> list[str]:
    """The device's own precision first (what --precision auto picks), then the others it runs."""
    first = resolved_precision(device, "auto")
    others = ["fp16", "fp32"] if device.type == "cuda" else ["bf16"]
    return [first, *(p for p in others if p != first)]


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


@dataclasses.dataclass(frozen=True)
class Backbones:
    """The models extraction runs: their files, how extract names them, their images' size."""

    label: str
    sam_type: str
    paths: dict[str, Path]
    image_size: int  # of the demo images they extract

    @property
    def tiny(self) -> bool:
        return self.sam_type == "tiny"

    def tflop_per_image(self, extractor: FeatureExtractor, items: list[dict], boxes_per_image: float) -> float:
        """TFLOP of one image's extraction. Real sizes: SAM's encoder, CLIP and the decoder for
        each box, counted on the meta device (no compute); tiny: counted on one batch run."""
        if self.tiny:
            return counted_gflop(lambda: extractor(items, "bench")) / len(items) / 1e3
        sam_gflop, box_gflop, clip_gflop = backbone_gflops()
        return (sam_gflop + clip_gflop + boxes_per_image * box_gflop) / 1e3


def backbones_for(out: Path, tiny: bool, clip: bool = True) -> Backbones:
    if tiny:
        paths = write_tiny_backbones(out / "tiny")
        return Backbones("tiny SAM + tiny CLIP", "tiny", paths, image_size=256)
    paths = write_real_backbones(out / "real", clip)
    return Backbones("SAM ViT-B@1024 + CLIP ViT-L/14", "vit_b", paths, image_size=640)


def timed_pass(extractor: FeatureExtractor, prepared: list[list[dict]], device: torch.device) -> tuple[float, float]:
    """(seconds of a pass over the prepared batches, seconds of the warm-up batch before it)."""
    start = now()
    extractor(prepared[0], "bench")  # warm-up, compilation included
    first = now() - start
    sync(device)
    start = now()
    for items in prepared:
        extractor(items, "bench")
    sync(device)
    return now() - start, first


def bench_extraction(
    table: Table, out: Path, device: torch.device, num_images: int, batch: int, profile: bool, tiny: bool
) -> None:
    backbones = backbones_for(out, tiny)
    data = generate_demo_dataset(
        out / f"{backbones.sam_type}_data", num_train=num_images, num_val=14, image_size=backbones.image_size, seed=0
    )
    records = sorted(load_coco(data["train_json"])[0], key=lambda r: r.image_id)[:num_images]
    boxes = sum(len(r.boxes) for r in records)
    cfg = ExtractConfig(
        images=str(data["train_images"]), annotations=str(data["train_json"]), out=str(out / "x"),
        sam_checkpoint=str(backbones.paths["sam_checkpoint"]), clip_model=str(backbones.paths["clip_dir"]),
        sam_type=backbones.sam_type, device=str(device), batch_size=batch,
    )  # fmt: skip
    prepared, tflop = None, None
    for precision in supported_precisions(device):
        # compiling SAM ViT-B on a 2-core CPU takes longer than the run; on a GPU try it in half precision
        for compiled in (False, True) if device.type == "cuda" and precision != "fp32" else (False,):
            extractor = load_extractor(dataclasses.replace(cfg, precision=precision, compile=compiled))
            if prepared is None:  # decoding + resizing happen in DataLoader workers in a real run
                dataset = ImageFeaturesInput(
                    [(0, r) for r in records], cfg.images, extractor.encoder.segmenter.transform
                )
                prepared = [
                    [dataset[i] for i in range(b, min(b + batch, len(dataset)))] for b in range(0, len(dataset), batch)
                ]
                tflop = backbones.tflop_per_image(extractor, prepared[0], boxes / num_images)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, first = timed_pass(extractor, prepared, device)
            setting = f"batch {batch}, --precision {precision}" + (" --compile" if compiled else "")
            extraction_row(
                table, backbones, device, setting, precision, num_images / seconds, boxes / seconds, first, tflop
            )
            if profile and (precision, compiled) == (supported_precisions(device)[-1], False):
                profile_extraction(extractor, prepared, device, out / "profile")
            del extractor
            if device.type == "cuda":
                torch.cuda.empty_cache()


def extraction_row(
    table: Table, backbones: Backbones, device: torch.device, setting: str, precision: str, rate: float,
    box_rate: float, first: float, tflop: float,
) -> None:  # fmt: skip
    """Images/s, and the share of the device's measured matmul rate in ``precision`` it reaches."""
    size = 512 if backbones.tiny else 8192 if device.type == "cuda" else 2048  # tiny: a check, not a measurement
    limit = matmul_gflops(PRECISION_DTYPES[precision], device, size) / 1e3
    peak = f", peak {peak_memory_gib(device):.1f} GiB" if device.type == "cuda" else ""
    table.add(
        f"real extract ({device.type}): {backbones.label}, {setting}",
        f"{rate:.3g} img/s, {box_rate:.3g} box/s{peak} (first batch {first:.0f} s)",
        f"{tflop * rate:.3g} of {limit:.3g} TFLOP/s measured {precision} matmul",
        100 * tflop * rate / limit,
        ratio_fmt="{:.0f}%",
        target=">= 40% (GPU)",
        met=tflop * rate / limit >= 0.4 if device.type == "cuda" else None,
        images_per_s=rate,
        tflop_per_image=tflop,
        matmul_tflops=limit,
        peak_gib=peak_memory_gib(device),
    )


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """Share of ``wall_us`` covered by the union of (start, end) intervals (kernels may overlap)."""
    covered, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered / max(wall_us, 1e-9)


def profile_extraction(extractor: FeatureExtractor, prepared: list, device: torch.device, out: Path) -> None:
    """One extraction pass under torch.profiler: top ops/kernels, a Chrome trace, GPU idle share."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        start = now()
        for items in prepared:
            extractor(items, "bench")
        sync(device)
        wall_us = (now() - start) * 1e6
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / "top_ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    prof.export_chrome_trace(str(out / "trace.json"))
    summary = {"device": str(device), "wall_s": wall_us / 1e6, "gpu_idle_fraction": None}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        starts = min((e.time_range.start for e in kernels), default=0.0)
        spans = [(e.time_range.start - starts, e.time_range.end - starts) for e in kernels]
        summary["gpu_idle_fraction"] = 1.0 - busy_fraction(spans, wall_us)
        summary["kernels"] = len(kernels)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    idle = summary["gpu_idle_fraction"]
    print(f"[bench-real] profile written to {out}/ (GPU idle {'n/a on CPU' if idle is None else f'{idle:.0%}'})")


def bench_segmenter_pair(table: Table, out: Path, device: torch.device, num_images: int, tiny: bool) -> None:
    """SAM 2.1 hiera-b+ beside SAM ViT-B (``--tiny``: the tiny pair) on the extraction's demo
    images and boxes: image-encoder time per image, decoder time per box."""
    backbones = backbones_for(out, tiny, clip=False)
    data = generate_demo_dataset(
        out / f"{backbones.sam_type}_data", num_train=num_images, num_val=14, image_size=backbones.image_size, seed=0
    )
    records = sorted(load_coco(data["train_json"])[0], key=lambda r: r.image_id)[:num_images]
    bench_segmenters(table, segmenter_cases(backbones.paths, tiny), records, data["train_images"], device)


def bench_training(table: Table, out: Path, device: torch.device, steps: int, workers: list[int], tiny: bool) -> None:
    """The BL head step from device memory in each precision, and the shard reader with each number
    of ``workers``, against the training goal (``tiny``: batches of 2, one warm-up step, 32 samples)."""
    batch, warm_up = (2, 1) if tiny else (16, 3)
    samples = 32 if tiny else 2048 if device.type == "cuda" else 256
    rng = np.random.default_rng(0)
    texts = torch.nn.functional.normalize(torch.randn(BL["classes"], BL["text_dim"]), dim=-1).to(device)
    batches = [bl_batch(rng, batch).to(device) for _ in range(4)]
    for precision in supported_precisions(device):
        torch.manual_seed(0)
        head = RegionSpotHead.from_variant("BL").to(device).train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=2.5e-5)
        with autocast_for(device, precision):
            for i in range(warm_up):  # fp16 runs without a GradScaler: a speed measurement only
                head_step(head, optimizer, batches[i % 4], texts)
            sync(device)
            start = now()
            for i in range(steps):
                head_step(head, optimizer, batches[i % 4], texts)
            sync(device)
        rate = batch * steps / (now() - start)
        table.add(
            f"real train ({device.type}): BL head step from device memory, {precision} autocast",
            f"{rate:.3g} img/s (batch {batch})", f"{TRAIN_TARGET} img/s (goal)", rate / TRAIN_TARGET,
            ratio_fmt="{:.3g}x", target=">= 1x (GPU)", met=rate >= TRAIN_TARGET if device.type == "cuda" else None,
            images_per_s=rate,
        )  # fmt: skip
    folder = write_bl_shards(out / "bl_train_real", samples, shard_size=32)
    for w in workers:
        rate, mbps = reader_rate(folder, w, 16, samples)
        table.add(
            f"real load: BL shard reader, workers {w}",
            f"{rate:.0f} samples/s, {mbps:.0f} MB/s",
            f"{TRAIN_TARGET} img/s (goal)",
            rate / TRAIN_TARGET,
            target=">= 1x",
            met=rate >= TRAIN_TARGET,
            samples_per_s=rate,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="working folder (git-ignored); reused between runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, help="demo images to extract (default 64; --tiny 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    p.add_argument("--steps", type=int, help="timed head steps per precision (default 50; --tiny 1)")
    p.add_argument("--workers", type=int, nargs="+", help="reader workers to try (default 0 2 4 8, capped by cores)")
    p.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES), help="which stages to run (default: all)"
    )
    p.add_argument(
        "--profile", action="store_true", help="profile one extraction pass (lowest precision, eager): OUT/profile/"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny random SAM and CLIP, 256 px images, one image, one head step of 2 images, 32 BL samples, "
        "workers 0, matmul rate at 512: "
        "the same code at sizes that run in seconds on a CPU (a check that the script runs, not a measurement)",
    )
    args = p.parse_args(argv)
    args.images = args.images or (1 if args.tiny else 64)
    args.steps = args.steps or (1 if args.tiny else 50)
    args.workers = args.workers or ([0] if args.tiny else [w for w in (0, 2, 4, 8) if w <= (os.cpu_count() or 1)])
    return args


def main(argv: list[str] | None = None) -> int:
    hf_logging.disable_progress_bar()
    args = parse_args(argv)
    device, out = torch.device(args.device), Path(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"[bench-real] {name}, torch {torch.__version__}, into {out}/", flush=True)
    started = now()
    table = Table()
    if "extract" in args.stages:
        bench_extraction(table, out, device, args.images, args.batch_size, args.profile, args.tiny)
    if "segmenters" in args.stages:
        bench_segmenter_pair(table, out, device, args.images, args.tiny)
    if "train" in args.stages:
        bench_training(table, out, device, args.steps, args.workers, args.tiny)
    total = now() - started
    print(f"\nregionspot_pl bench-real, {name}, torch {torch.__version__}, {total:.0f} s\n")
    print(table.render())
    report = {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "seconds": round(total, 1),
        "rows": table.rows,
    }
    (out / "bench_real.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten: {out / 'bench_real.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
