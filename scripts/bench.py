"""`make bench`: every stage of regionspot_pl against its naive alternative, as ratios, in one run.

    .venv/bin/python scripts/bench.py            # default: the full-size LVIS metric step (14 min on 2 CPU
                                                 # cores, ~3 min more to write its inputs once), then 2 min 47 s
    .venv/bin/python scripts/bench.py --quick    # a check that every stage runs: tiny sizes, one pass
    .venv/bin/python scripts/bench.py --stages serve   # one stage (or a few) alone
    make bench ARGS="--quick"

Everything is generated under bench_out/ (demo images, tiny random backbones, shards, synthetic
RegionSpot-BL-size shards); nothing is downloaded. Stages (scripts/benchmarks/):

- extraction (``extract_stage``): tiny SAM + tiny CLIP on demo images. Ours = ``FeatureExtractor``
  on batches of 8 fed by ``ImageFeaturesInput`` in a DataLoader, samples written with
  ``AtomicShardWriter`` (the loop of ``run_extraction``), split into its parts with the same public
  calls. Naive = segment-anything's ``SamPredictor`` (set_image per image, predict per box, fp32)
  and CLIP one image at a time.
- loading (``load_stage``): the shard reader (``RegionDataModule.train_dataloader``: tar reading,
  .npy decoding, validation, shuffle buffer, ``collate_regions``) against ``cat`` of the same files
  from page cache, and our decode path against webdataset's own (``tarfile`` + ``np.load``).
- FLOPs (``flops_stage``): what the GPU goals ask of the hardware, counted.
- training (``train_stage``): the RegionSpot-BL head (clip_dim 1024, text_dim 768, T = 257, ~16
  boxes per image, batch 16, fp32, AdamW step) from features in memory and through the shard
  reader, against running a real-size CLIP ViT-L/14 vision tower (and SAM ViT-B's image encoder)
  per batch as the reference does.
- serving (``serve_stage``): ``python -m regionspot_pl.serve`` on the tiny backbones over HTTP, 16
  concurrent clients: throughput with LitServe's batching (``--max_batch_size 8``) against one
  request at a time, latency p50/p99, a second round of prompts on cached images against the first,
  and the server's memory before and after 2,000 requests that keep its caches evicting.
- evaluation (``eval_stage``): ``test.regionspot_logits`` over cached splits, batched against one
  image at a time; the LVIS metric step at full LVIS v1 val size (19,809 images, 1,203 classes,
  300 detections per image; scripts/bench_metrics.py), hotcoco against the LVIS API, each as
  ``python -m regionspot_pl.evaluate GT RESULTS`` runs it, in a process of its own. This part runs
  first and takes most of the time (the LVIS API: ~15 minutes and ~20 GB of memory at full size on
  2 cores; with less memory available it runs at the largest scale that fits, and says so);
  ``--metric-scale`` shrinks it.

``--quick`` runs every stage at tiny sizes, once (the metric step at 0.002 = 40 images, 2 images
to extract, 4 to evaluate, one training step of 2 images), without what alone takes 10 s or more
on a CPU (``--compile``'s compilation, real-size CLIP and SAM on the fly): its numbers say
little, it shows that the benchmark runs. CPU timings on a shared machine are noisy: read the ratios (both sides
measured in this run), take absolute numbers as indicative. Prints one table; writes it to
bench_out/bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchmarks, scripts/bench_metrics.py

from benchmarks.bl_shards import write_bl_shards  # noqa: E402
from benchmarks.common import Table, cpu_name, now  # noqa: E402
from benchmarks.data_stage import demo_inputs, demo_shards  # noqa: E402
from benchmarks.eval_stage import bench_evaluation, bench_metric_step  # noqa: E402
from benchmarks.extract_stage import OPTIONS, bench_extraction  # noqa: E402
from benchmarks.flops_stage import bench_flops  # noqa: E402
from benchmarks.load_stage import bench_loading  # noqa: E402
from benchmarks.serve_stage import QUICK as SERVE_QUICK  # noqa: E402
from benchmarks.serve_stage import ServeSizes, bench_serving, tiny_served_model  # noqa: E402
from benchmarks.train_stage import bench_training  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each stage does: the default run, or ``--quick``'s tiny one."""

    images: int = 48  # demo train images to extract
    val_images: int = 14  # demo val images (the set has 14 or more) to evaluate on
    metric_scale: float = 1.0  # of LVIS v1 val
    reps: int = 2  # extraction passes, ours and naive
    options: tuple[str, ...] = tuple(OPTIONS)
    bl_train: int = 256  # BL-size samples to read and train from
    bl_eval: int = 48
    load_samples: tuple[int, int] = (3000, 512)  # read per measurement: demo, BL
    load_rounds: int = 3
    train_steps: int = 4
    train_batch: int = 16  # images per BL head step, trained and counted
    matmul_size: int = 2048  # of the square matrices the CPU's matmul rate is measured on
    on_the_fly_batches: int = 2
    with_sam: bool = True
    eval_repeat: int = 3
    serve: ServeSizes = ServeSizes()


STAGES = ("metrics", "extract", "load", "flops", "train", "eval", "serve")
QUICK = Sizes(
    images=2, val_images=4, metric_scale=0.002, reps=1, options=("--precision bf16",), bl_train=32, bl_eval=4,
    load_samples=(64, 32), load_rounds=1, train_steps=1, train_batch=2, on_the_fly_batches=0, with_sam=False,
    eval_repeat=1, matmul_size=1024, serve=SERVE_QUICK,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every stage at tiny sizes, once (a check that it runs)")
    p.add_argument("--out", default="bench_out", help="working folder (git-ignored); reused between runs")
    p.add_argument("--images", type=int, help=f"demo images to extract (default {Sizes.images}, quick {QUICK.images})")
    p.add_argument(
        "--metric-scale",
        type=float,
        help="fraction of LVIS v1 val for the metric step (default 1: full size, ~20 min, ~20 GB; quick 0.002)",
    )
    p.add_argument("--no-sam", action="store_true", help="skip SAM ViT-B's encoder on the fly (~20 s; quick skips it)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="the stages to run (default: all)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(
        sizes,
        images=args.images or sizes.images,
        metric_scale=args.metric_scale or sizes.metric_scale,
        with_sam=sizes.with_sam and not args.no_sam,
    )
    return args, sizes


def run_stages(table: Table, out: Path, sizes: Sizes, stages: set[str]) -> None:
    if "metrics" in stages:  # first, while this process is small: the LVIS API's needs ~20 GB at full size
        bench_metric_step(table, out / "metrics", sizes.metric_scale)
    data, backbones = demo_inputs(out, sizes.images, max(14, sizes.val_images))
    if "extract" in stages:
        bench_extraction(table, out, data, backbones, sizes.images, sizes.reps, list(sizes.options), sizes.matmul_size)
    if stages & {"load", "train", "eval"}:
        train = demo_shards(out, data, backbones, "train", sizes.images, max(1, sizes.images // 4))
        val = demo_shards(out, data, backbones, "val", sizes.val_images, max(1, sizes.val_images // 2))
        bl_train = write_bl_shards(out / "bl_train", sizes.bl_train)
        bl_eval = write_bl_shards(out / "bl_eval", sizes.bl_eval, shard_size=16)
    if "load" in stages:
        samples = dict(zip(("demo", "BL"), sizes.load_samples))
        bench_loading(table, {"demo": train, "BL": bl_train}, samples, sizes.load_rounds)
    if "flops" in stages:
        bench_flops(table, sizes.train_batch)
    if "train" in stages:
        bench_training(table, bl_train, sizes.train_steps, sizes.on_the_fly_batches, sizes.with_sam, sizes.train_batch)
    if "eval" in stages:
        bench_evaluation(table, val, bl_eval, sizes.eval_repeat)
    if "serve" in stages:
        bench_serving(table, out, data, tiny_served_model(backbones), sizes.serve)


def report(table: Table, out: Path, quick: bool, sizes: Sizes, seconds: float, load: tuple[float, float]) -> None:
    """Prints the table (and a note when other processes loaded the CPU); writes out/bench.json."""
    run = "quick" if quick else "default"
    print(
        f"\nregionspot_pl bench ({run}), {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{seconds:.0f} s in all, load average {load[0]:.1f} -> {load[1]:.1f}; "
        "ratio = ours / naive (speed-up) unless a % of a limit\n"
    )
    print(table.render())
    if load[0] > 0.5:
        print(
            f"\nnote: load average {load[0]:.1f} before the run on {os.cpu_count()} cores: other processes "
            "shared the CPU. Compared sides alternate in time, but oversubscribed threads slow many small ops "
            "(the naive loops) more than a few big ones, so speed-ups come out larger than on a quiet machine."
        )
    summary = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "images": sizes.images,
        "metric_scale": sizes.metric_scale,
        "seconds": round(seconds, 1),
        "load_average": [round(v, 2) for v in load],
        "rows": table.rows,
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nwritten: {out / 'bench.json'}")


def main(argv: list[str] | None = None) -> int:
    hf_logging.disable_progress_bar()
    args, sizes = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = now(), os.getloadavg()[0]
    torch.manual_seed(0)
    print(
        f"[bench] load average {load_before:.2f}; {cpu_name()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'quick' if args.quick else 'default'} run into {out}/",
        flush=True,
    )
    table = Table()
    run_stages(table, out, sizes, set(args.stages))
    report(table, out, args.quick, sizes, now() - started, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
