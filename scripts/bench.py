"""`make bench`: every stage of regionspot_pl against its naive alternative, as ratios, in one run.

    .venv/bin/python scripts/bench.py            # default: the full-size LVIS metric step (14 min on 2 CPU
                                                 # cores, ~3 min more to write its inputs once), then 2 min 47 s
    .venv/bin/python scripts/bench.py --quick    # smaller: the metric step at 1/20 (~1 min), then 1 min 34 s
    make bench ARGS="--quick"

Everything is generated under bench_out/ (demo images, tiny random backbones, shards, synthetic
RegionSpot-BL-size shards); nothing is downloaded. Stages:

- extraction: tiny SAM + tiny CLIP on demo images. Ours = ``FeatureExtractor`` on batches of 8 fed
  by ``ImageFeaturesInput`` in a DataLoader, samples written with ``AtomicShardWriter`` (the loop
  of ``run_extraction``), split into its parts with the same public calls. Naive = segment-anything's
  ``SamPredictor`` (set_image per image, predict per box, fp32) and CLIP one image at a time.
- loading: the shard reader (``RegionDataModule.train_dataloader``: tar reading, .npy decoding,
  validation, shuffle buffer, ``collate_regions``) against ``cat`` of the same files from page cache,
  and our decode path against webdataset's own (``tarfile`` + ``np.load``) on the same batches.
- training: the RegionSpot-BL head (clip_dim 1024, text_dim 768, T = 257, ~16 boxes per image,
  batch 16, fp32, AdamW step) from features in memory and through the shard reader, against running
  a real-size CLIP ViT-L/14 vision tower (and SAM ViT-B's image encoder) per batch as the reference does.
- evaluation: ``test.regionspot_logits`` over cached splits, batched against one image at a time;
  the LVIS metric step at full LVIS v1 val size (19,809 images, 1,203 classes, 300 detections per
  image; scripts/bench_metrics.py), hotcoco against the LVIS API, each as
  ``python -m regionspot_pl.evaluate GT RESULTS`` runs it, in a process of its own. This part runs
  first and takes most of the time (the LVIS API: ~15 minutes and ~20 GB of memory at full size on
  2 cores; with less memory available it runs at the largest scale that fits, and says so);
  ``--metric-scale`` shrinks it (``--quick``: 0.05).

CPU timings on a shared machine are noisy: read the ratios (both sides measured in this run), take
absolute numbers as indicative. Prints one table; writes it to bench_out/bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/bench_metrics.py

import bench_metrics  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from regionspot_pl.backbones.clip import clip_preprocess  # noqa: E402
from regionspot_pl.backbones.image import (  # noqa: E402
    masks_to_original,
    read_image,
    resize_for_backbones,
    scale_boxes,
)
from regionspot_pl.backbones.tiny import write_tiny_backbones  # noqa: E402
from regionspot_pl.cache.manifest import MANIFEST, ClipBackbone, Manifest, SamBackbone  # noqa: E402
from regionspot_pl.cache.shards import (  # noqa: E402
    ARRAY_MEMBERS,
    AtomicShardWriter,
    ShardFormatError,
    decode_sample,
    encode_sample,
    iter_samples,
    list_shards,
    shard_name,
    tar_members,
    validate_sample,
)
from regionspot_pl.data.annotations import Vocabulary  # noqa: E402
from regionspot_pl.data.records import load_coco  # noqa: E402
from regionspot_pl.demo.scenes import generate_demo_dataset  # noqa: E402
from regionspot_pl.evaluation.zero_shot import regionspot_logits  # noqa: E402
from regionspot_pl.extract.run import (  # noqa: E402
    ExtractConfig,
    FeatureExtractor,
    ImageFeaturesInput,
    run_extraction,
)
from regionspot_pl.model import RegionSpotHead, region_focal_loss, region_logits  # noqa: E402
from regionspot_pl.train.datamodule import DataConfig, RegionDataModule, collate_regions  # noqa: E402
from regionspot_pl.utils.io import masks_to_rle  # noqa: E402

BATCH = 8  # extraction batch (run_extraction's default)
PARTS = ("prep", "sam_encoder", "clip", "decoder", "rle", "write")
BL = {"clip_dim": 1024, "text_dim": 768, "tokens": 257, "boxes": 16, "classes": 365}
LVIS_IMAGES = bench_metrics.LVIS_VAL["images"]
TRAIN_TARGET = 5000  # images/s: the goal for training from the cache on one GPU (docs/benchmarks.md)


def now() -> float:
    return time.perf_counter()


class Table:
    """Rows of (stage, ours, naive/limit, ratio, target, met?) plus the raw numbers for the JSON."""

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
        cols = ["stage", "ours", "naive/limit", "ratio", "target", "met?"]
        width = {c: max(len(c), *(len(r[c]) for r in self.rows)) for c in cols}
        line = "| " + " | ".join(c.ljust(width[c]) for c in cols) + " |"
        sep = "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|"
        body = ["| " + " | ".join(r[c].ljust(width[c]) for c in cols) + " |" for r in self.rows]
        return "\n".join([line, sep, *body])


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------


def bench_extraction(table: Table, out: Path, data: dict, backbones: dict, num_images: int, reps: int) -> dict:
    records, vocab, _ = load_coco(data["train_json"])
    records = sorted(records, key=lambda r: r.image_id)[:num_images]
    num_boxes = sum(len(r.boxes) for r in records)
    cfg = ExtractConfig(
        images=str(data["train_images"]),
        annotations=str(data["train_json"]),
        out=str(out / "x"),
        sam_checkpoint=str(backbones["sam_checkpoint"]),
        clip_model=str(backbones["clip_dir"]),
        sam_type="tiny",
        device="cpu",
        batch_size=BATCH,
        precision="fp32",
    )
    extractor = FeatureExtractor(cfg)
    sam, clip = extractor.sam, extractor.clip
    dataset = ImageFeaturesInput([(0, r) for r in records], cfg.images, sam.transform)
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    # warm-up: one batch through everything (first-call allocations, lazy inits)
    extractor([dataset[i] for i in range(min(BATCH, len(dataset)))], "bench")

    # -- ours, end to end: run_extraction's loop (DataLoader decoding workers -> FeatureExtractor -> writer)
    def end_to_end(workers: int, extract: FeatureExtractor = extractor) -> float:
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=list)
        writer = AtomicShardWriter(scratch / f"e2e-w{workers}.tar")
        start = now()
        for items in loader:
            for sample in extract(items, "bench"):
                writer.write(sample)
        writer.commit({})
        return now() - start

    def split_batch(b: int, split: dict, writer: AtomicShardWriter) -> None:
        """Ours on images [b, b + BATCH), split into parts with the calls FeatureExtractor makes."""
        with torch.inference_mode():
            t = now()
            items = [dataset[i] for i in range(b, min(b + BATCH, len(dataset)))]
            split["prep"] += now() - t
            t = now()
            sam_in = sam.prepare([it["sam_image"] for it in items])
            per_call = 1 if extractor.device.type == "cpu" else len(sam_in)  # as FeatureExtractor does
            embeddings = torch.cat([sam.encode_images(chunk) for chunk in sam_in.split(per_call)])
            split["sam_encoder"] += now() - t
            t = now()
            clip_in = torch.stack([clip_preprocess(it["clip_image"], clip.image_size) for it in items])
            clip_tokens = clip.feature_map(clip_in).half().cpu().numpy()
            split["clip"] += now() - t
            for i, it in enumerate(items):
                rec = it["record"]
                t = now()
                original, resized = (rec.height, rec.width), tuple(it["resized_size"])
                boxes = scale_boxes(torch.from_numpy(rec.boxes), original, resized)
                tokens, masks = sam.encode_boxes(embeddings[i], boxes, resized)
                split["decoder"] += now() - t
                t = now()
                rles = masks_to_rle(masks_to_original(masks, original))
                split["rle"] += now() - t
                t = now()
                meta = {
                    "file_name": rec.file_name,
                    "width": rec.width,
                    "height": rec.height,
                    "dataset": "bench",
                    "masks": rles,
                }
                writer.write(
                    encode_sample(
                        rec.image_id,
                        tokens.float().cpu().numpy(),
                        rec.boxes,
                        rec.labels,
                        rec.scores,
                        clip_tokens[i],
                        meta,
                    )
                )
                split["write"] += now() - t

    # naive: SamPredictor per box, CLIP per image (the same tiny models, fp32, no_grad as SamPredictor)
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam.sam)
    image_dir = Path(cfg.images)

    def naive_batch(b: int, naive: dict, writer: AtomicShardWriter) -> None:
        """The naive way on the same images [b, b + BATCH)."""
        captured: list[torch.Tensor] = []
        hook = sam.sam.mask_decoder.transformer.register_forward_hook(lambda _m, _i, o: captured.append(o[0]))
        try:
            for rec in records[b : b + BATCH]:
                t = now()
                image, _ = read_image(image_dir / rec.file_name)
                resized = resize_for_backbones(image)
                sam_input = (
                    torch.as_tensor(predictor.transform.apply_image(resized)).permute(2, 0, 1)[None].contiguous()
                )
                clip_input = clip_preprocess(torch.from_numpy(resized).permute(2, 0, 1), clip.image_size)[None]
                naive["prep"] += now() - t
                t = now()
                predictor.set_torch_image(sam_input, resized.shape[:2])
                naive["sam_encoder"] += now() - t
                t = now()
                with torch.no_grad():
                    clip_tokens = clip.feature_map(clip_input)[0].half().numpy()
                naive["clip"] += now() - t
                tokens, rles = [], []
                (h, w), (rh, rw) = image.shape[:2], resized.shape[:2]
                for box in rec.boxes:
                    t = now()
                    captured.clear()
                    mask, _, _ = predictor.predict(
                        box=box * np.array([rw / w, rh / h, rw / w, rh / h]), multimask_output=False
                    )
                    tokens.append(captured[0][0, 1].float().numpy())
                    naive["decoder"] += now() - t
                    t = now()
                    rles += masks_to_rle(masks_to_original(torch.from_numpy(mask), (h, w)))
                    naive["rle"] += now() - t
                t = now()
                meta = {
                    "file_name": rec.file_name,
                    "width": rec.width,
                    "height": rec.height,
                    "dataset": "bench",
                    "masks": rles,
                }
                sam_tokens = np.stack(tokens) if tokens else np.zeros((0, 256), np.float32)
                writer.write(
                    encode_sample(rec.image_id, sam_tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, meta)
                )
                naive["write"] += now() - t
        finally:
            hook.remove()

    # Ours and naive alternate batch by batch (which goes first alternates too), so load from other
    # processes on a shared machine falls on both sides alike; times are summed over `reps` passes.
    split = dict.fromkeys(PARTS, 0.0)
    naive = dict.fromkeys(PARTS, 0.0)
    for r in range(reps):
        w_ours, w_naive = AtomicShardWriter(scratch / "ours.tar"), AtomicShardWriter(scratch / "naive.tar")
        for k, b in enumerate(range(0, len(dataset), BATCH)):
            if (k + r) % 2:
                naive_batch(b, naive, w_naive)
                split_batch(b, split, w_ours)
            else:
                split_batch(b, split, w_ours)
                naive_batch(b, naive, w_naive)
        w_ours.commit({})
        w_naive.commit({})
    e2e = {w: end_to_end(w) for w in (0, 2)}
    # the options: bf16 autocast (as on GPUs; fast only on CPUs with AVX512-BF16/AMX) and
    # torch.compile, each timed after a warm-up pass that includes the compilation
    options = {
        "--precision bf16": {"precision": "bf16"},
        "--compile": {"compile": True},
        "--compile --precision bf16": {"compile": True, "precision": "bf16"},
    }
    e2e_fp32 = min(e2e[0], end_to_end(0))
    variants = {}
    for flags, change in options.items():
        variant = FeatureExtractor(dataclasses.replace(cfg, **change))
        warm_up = end_to_end(0, variant)
        variants[flags] = (min(end_to_end(0, variant), end_to_end(0, variant)), warm_up)
        del variant
    n_img, n_box = reps * num_images, reps * num_boxes
    ours_total, naive_total = sum(split.values()), sum(naive.values())
    ratio = naive_total / ours_total
    table.add(
        f"extract: tiny SAM@{sam.img_size}+tiny CLIP, {num_images} img / {num_boxes} boxes x{reps}",
        f"{n_img / ours_total:.1f} img/s, {n_box / ours_total:.0f} box/s (batch {BATCH})",
        f"{n_img / naive_total:.1f} img/s, {n_box / naive_total:.0f} box/s (SamPredictor per box)",
        ratio,
        target=">= 5x",
        met=ratio >= 5,
        seconds_ours=ours_total,
        seconds_naive=naive_total,
        images=n_img,
        boxes=n_box,
    )
    for flags, (seconds, warm_up) in variants.items():
        table.add(
            f"extract: run_extraction's loop, {flags} vs default fp32 (workers 0)",
            f"{num_images / seconds:.1f} img/s (first pass {warm_up:.0f} s)",
            f"{num_images / e2e_fp32:.1f} img/s",
            e2e_fp32 / seconds,
            seconds=seconds,
            first_pass_seconds=warm_up,
            seconds_fp32=e2e_fp32,
        )
    fastest = min(variants, key=lambda k: variants[k][0])
    best = naive_total / reps / variants[fastest][0]
    table.add(
        f"extract: fastest option ({fastest}) vs naive (SamPredictor per box)",
        f"{num_images / variants[fastest][0]:.1f} img/s",
        f"{n_img / naive_total:.1f} img/s",
        best,
        target=">= 5x",
        met=best >= 5,
    )
    # the decoder's arithmetic against what this CPU's matmul units deliver: how much room is left
    rec = max(records, key=lambda r: len(r.boxes))
    with torch.inference_mode():
        item = dataset[records.index(rec)]
        emb = sam.encode_images(sam.prepare([item["sam_image"]]))[0]
        boxes = scale_boxes(torch.from_numpy(rec.boxes), (rec.height, rec.width), tuple(item["resized_size"]))
        per_box = counted_gflop(lambda: sam.encode_boxes(emb, boxes, tuple(item["resized_size"])))
    per_box /= len(rec.boxes)
    rate = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    work = per_box * n_box
    table.add(
        f"extract: decoder arithmetic ({per_box:.2f} GFLOP/box counted) vs CPU fp32 matmul rate",
        f"{work / split['decoder']:.0f} GFLOP/s = {100 * work / split['decoder'] / rate[torch.float32]:.0f}%",
        f"naive {work / naive['decoder']:.0f} GFLOP/s = {100 * work / naive['decoder'] / rate[torch.float32]:.0f}%",
        100 * work / split["decoder"] / rate[torch.float32],
        ratio_fmt="{:.0f}%",
        gflop_per_box=per_box,
    )
    table.add(
        "cpu: measured matmul rate (2048 x 2048, torch), bf16 vs fp32",
        f"bf16 {rate[torch.bfloat16]:.0f} GFLOP/s",
        f"fp32 {rate[torch.float32]:.0f} GFLOP/s",
        rate[torch.bfloat16] / rate[torch.float32],
        fp32_gflops=rate[torch.float32],
        bf16_gflops=rate[torch.bfloat16],
    )
    table.add(
        "extract: run_extraction's loop (DataLoader), workers 2 vs 0",
        f"w2 {num_images / e2e[2]:.1f} img/s",
        f"w0 {num_images / e2e[0]:.1f} img/s",
        e2e[0] / e2e[2],
        seconds_by_workers=e2e,
    )
    num_images = n_img
    labels = {
        "prep": "image decode + preprocess",
        "sam_encoder": "SAM image encoder",
        "clip": "CLIP encoder",
        "decoder": "prompt/mask decoder",
        "rle": "mask RLE",
        "write": "sample encoding + tar write",
    }
    split_total = ours_total
    for key, label in labels.items():
        share = 100 * split[key] / split_total
        table.add(
            f"extract: {label} [{share:.0f}% of ours, {100 * naive[key] / naive_total:.0f}% of naive]",
            f"{1000 * split[key] / num_images:.1f} ms/img",
            f"{1000 * naive[key] / num_images:.1f} ms/img",
            naive[key] / max(split[key], 1e-9),
            ms_per_image_ours=1000 * split[key] / num_images,
            ms_per_image_naive=1000 * naive[key] / num_images,
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return {"ours_s": ours_total, "naive_s": naive_total, "split": split, "naive": naive}


# ---------------------------------------------------------------------------------------------
# synthetic RegionSpot-BL shards (what extracting O365 with SAM ViT-B + CLIP ViT-L/14 writes)
# ---------------------------------------------------------------------------------------------


def bl_sample(rng: np.random.Generator, image_id: int) -> dict:
    n = max(1, int(rng.poisson(BL["boxes"])))
    xy = rng.uniform(0, 400, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 200, size=(n, 2))], axis=1).astype(np.float32)
    return encode_sample(
        image_id,
        rng.standard_normal((n, 256)).astype(np.float16),
        boxes,
        rng.integers(0, BL["classes"], n),
        np.ones(n, np.float32),
        rng.standard_normal((BL["tokens"], BL["clip_dim"])).astype(np.float16),
        {"file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480, "dataset": "bl"},
    )


def write_bl_shards(folder: Path, num_images: int, shard_size: int = 32) -> Path:
    try:
        if Manifest.read(folder).config.get("images") == num_images:
            return folder
    except ShardFormatError:
        pass  # none yet, or of an older format or protocol: write them again
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for j, start in enumerate(range(0, num_images, shard_size)):
        writer = AtomicShardWriter(folder / shard_name("bl", 0, j))
        for image_id in range(start + 1, min(start + shard_size, num_images) + 1):
            writer.write(bl_sample(rng, image_id))
        writer.commit({"num_classes": BL["classes"]})
    vocab = Vocabulary(tuple(f"class_{i}" for i in range(BL["classes"])), tuple(range(1, BL["classes"] + 1)))
    clip = ClipBackbone("synthetic ViT-L/14", "synthetic", 224, BL["tokens"], BL["clip_dim"], BL["text_dim"])
    sam = SamBackbone("synthetic", "none", "synthetic", 1024)
    Manifest(
        vocab, sam, clip, text_cache="", precision="fp16", dataset="bl", config={"masks": False, "images": num_images}
    ).write(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def raw_read_rate(files: list[Path], min_bytes: int) -> float:
    """MB/s of `cat files > /dev/null` from page cache, the list repeated to read >= min_bytes."""
    size = sum(f.stat().st_size for f in files)
    repeat = max(1, math.ceil(min_bytes / size))
    args = ["cat", *[str(f) for f in files] * repeat]
    subprocess.run(args, stdout=subprocess.DEVNULL, check=True)  # warm-up: into page cache
    best = math.inf
    for _ in range(3):
        start = now()
        subprocess.run(args, stdout=subprocess.DEVNULL, check=True)
        best = min(best, now() - start)
    return size * repeat / best / 1e6


def reader_rate(folder: Path, workers: int, batch_size: int, num_samples: int) -> tuple[float, float]:
    """(samples/s, MB/s of shard bytes) of RegionDataModule's training loader, after the first batch."""
    shards = list_shards(folder)
    count = sum(json.loads(s.with_suffix(".json").read_text())["samples"] for s in shards)
    bytes_per_sample = sum(s.stat().st_size for s in shards) / count
    dm = RegionDataModule(DataConfig([str(folder)], batch_size=batch_size, workers=workers, shuffle_buffer=64))
    loader = iter(dm.train_dataloader())
    next(loader)  # worker start-up and the shuffle buffer's fill are not the steady rate
    seen, start = 0, now()
    while seen < num_samples:
        batch = next(loader)
        seen += len(batch.meta)
    elapsed = now() - start
    del loader
    gc.collect()
    return seen / elapsed, seen * bytes_per_sample / elapsed / 1e6


def decode_rate(shards: list[Path], reader: str, batch_size: int = 16) -> float:
    """samples/s of one pass over the shards in one process (no shuffle). ``reader``:
    "ours" = ``shards.iter_samples`` + ``collate_regions``; "webdataset" = its ``tarfile`` reader and
    ``np.load`` per member + ``collate_regions``; "tar" = our tar member loop alone (no decoding)."""

    def webdataset_samples():
        for raw in wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False):
            arrays = {k[:-4]: np.load(io.BytesIO(v), allow_pickle=False) for k, v in raw.items() if k.endswith(".npy")}
            yield validate_sample({"__key__": raw["__key__"], "meta": json.loads(raw["json"]), **arrays})

    start = now()
    if reader == "tar":
        members = 0
        for shard in shards:
            with open(shard, "rb") as stream:
                members += sum(1 for _ in tar_members(stream, str(shard)))
        return members / (len(ARRAY_MEMBERS) + 1) / (now() - start)
    seen, batch = 0, []
    for sample in iter_samples(shards) if reader == "ours" else webdataset_samples():
        sample["dataset_index"] = 0
        batch.append(sample)
        if len(batch) == batch_size:
            collate_regions(batch)
            seen, batch = seen + batch_size, []
    return seen / (now() - start)


class ReadyBatches(IterableDataset):
    """Batches collated from samples held in memory: a worker that reads nothing, so the main
    process's time per batch is the DataLoader's worker -> main transfer alone (shared memory)."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __iter__(self):
        while True:
            yield collate_regions(self.samples)


def transfer_ms(folder: Path) -> float:
    """Median ms for the main process to receive one batch of 16 that a worker has ready."""
    samples = [s | {"dataset_index": 0} for s in itertools.islice(iter_samples(list_shards(folder)), 16)]
    loader = iter(DataLoader(ReadyBatches(samples), batch_size=None, num_workers=1, prefetch_factor=4))
    next(loader)
    times = []
    for _ in range(6):
        time.sleep(0.3)  # the worker fills its prefetch queue
        for _ in range(4):
            start = now()
            next(loader)
            times.append(now() - start)
    del loader
    return 1000 * sorted(times)[len(times) // 2]


def bench_loading(table: Table, folders: dict[str, Path], samples: dict[str, int]) -> dict:
    results = {}
    for name, folder in folders.items():
        files = list_shards(folder)
        size = sum(f.stat().st_size for f in files)
        count = sum(json.loads(f.with_suffix(".json").read_text())["samples"] for f in files)
        raw = raw_read_rate(files, min_bytes=max(size, 200_000_000))
        for workers in (0, 2):
            rate, mbps = reader_rate(folder, workers, 16, samples[name])
            pct = mbps / raw
            table.add(
                f"load: {name} shards ({size / count / 1e3:.0f} kB/sample), workers {workers}",
                f"{rate:.0f} samples/s, {mbps:.0f} MB/s",
                f"cat {raw:.0f} MB/s (page cache)",
                100 * pct,
                ratio_fmt="{:.0f}%",
                target=">= 70%",
                met=pct >= 0.7,
                samples_per_s=rate,
                mb_per_s=mbps,
                raw_mb_per_s=raw,
            )
            results[(name, workers)] = (rate, mbps, raw)
        # alternate the readers, best of 3 each: outside load falls on all alike
        rates = dict.fromkeys(("ours", "webdataset", "tar"), 0.0)
        for _ in range(3):
            for reader in rates:
                rates[reader] = max(rates[reader], decode_rate(files, reader))
        table.add(
            f"load: {name} decode path (one pass, batches of 16, workers 0)",
            f"{rates['ours']:.0f} samples/s",
            f"{rates['webdataset']:.0f} samples/s (webdataset tarfile + np.load)",
            rates["ours"] / rates["webdataset"],
            samples_per_s=rates["ours"],
            naive_samples_per_s=rates["webdataset"],
        )
        tar_mbps = rates["tar"] * size / count / 1e6
        table.add(
            f"load: {name} tar member loop alone (no decoding, no batching)",
            f"{rates['tar']:.0f} samples/s, {tar_mbps:.0f} MB/s",
            f"cat {raw:.0f} MB/s (page cache)",
            100 * tar_mbps / raw,
            ratio_fmt="{:.0f}%",
            samples_per_s=rates["tar"],
            mb_per_s=tar_mbps,
        )
    ms = transfer_ms(folders["BL"])
    table.add(
        "load: DataLoader worker -> main transfer of a ready BL batch (16 x 541 kB)",
        f"{ms:.2f} ms/batch = at most {16000 / ms:.0f} samples/s",
        f"{TRAIN_TARGET} img/s (training goal)",
        16000 / ms / TRAIN_TARGET,
        ms_per_batch=ms,
    )
    # The consumer is the limit that matters: RegionSpot-BL training at the GPU goal of 5,000 img/s
    # needs 5,000 samples/s from the loader workers together.
    rate = max(results[("BL", w)][0] for w in (0, 2))
    table.add(
        "load: BL reader (best of workers 0/2, one process) vs GPU training goal",
        f"{rate:.0f} samples/s",
        f"{TRAIN_TARGET} img/s (training goal)",
        rate / TRAIN_TARGET,
        target=">= 1x",
        met=rate >= TRAIN_TARGET,
        samples_per_s=rate,
    )
    return results


# ---------------------------------------------------------------------------------------------
# FLOPs: what the GPU goals ask of the hardware
# ---------------------------------------------------------------------------------------------

H100_BF16_SPEC = 989  # TFLOP/s, H100 SXM dense bf16 datasheet figure (a measured matmul rate needs a GPU)
EXTRACT_TARGET = 300  # images/s per GPU: the extraction goal (docs/benchmarks.md)


def clip_vit_l14():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
        )
    ).eval()


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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def backbone_gflops(boxes: int = 16) -> tuple[float, float, float]:
    """(SAM ViT-B@1024 image encoder per image, its prompt + mask decoder per box, CLIP ViT-L/14@224
    per image) in GFLOP, counted by torch's FlopCounterMode (matmuls and convolutions, 2 per
    multiply-add) on the meta device: shapes only, no compute."""
    from segment_anything import sam_model_registry

    with torch.device("meta"), torch.no_grad():
        sam = sam_model_registry["vit_b"](checkpoint=None).eval().requires_grad_(False)
        sam_enc = counted_gflop(lambda: sam.image_encoder(torch.empty(1, 3, 1024, 1024)))
        box_xyxy = torch.empty(boxes, 4)

        def decode():
            sparse, dense = sam.prompt_encoder(points=None, boxes=box_xyxy, masks=None)
            sam.mask_decoder(torch.empty(1, 256, 64, 64), sam.prompt_encoder.get_dense_pe(), sparse, dense, False)

        per_box = counted_gflop(decode) / boxes
        clip = counted_gflop(lambda: clip_vit_l14().requires_grad_(False)(pixel_values=torch.empty(1, 3, 224, 224)))
    return sam_enc, per_box, clip


def bench_flops(table: Table) -> dict:
    """FLOPs of real-size SAM ViT-B, CLIP ViT-L/14 (``backbone_gflops``) and the BL head step
    (counted while it runs for real)."""
    boxes = BL["boxes"]
    sam_enc, per_box, clip = backbone_gflops()
    per_image = sam_enc + clip + boxes * per_box

    torch.manual_seed(0)
    head = RegionSpotHead.from_variant("BL").train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=2.5e-5)
    texts = torch.nn.functional.normalize(torch.randn(BL["classes"], BL["text_dim"]), dim=-1)
    rng = np.random.default_rng(2)
    batch = collate_regions([decode_sample(bl_sample(rng, i + 1)) | {"dataset_index": 0} for i in range(16)])
    head_per_image = counted_gflop(lambda: head_step(head, optimizer, batch, texts)) / 16

    need = EXTRACT_TARGET * per_image / 1e3
    table.add(
        "flops: SAM ViT-B@1024 encoder + CLIP ViT-L/14@224 + 16 boxes' decoder (counted)",
        f"{per_image:.0f} GFLOP/img ({sam_enc:.0f} + {clip:.0f} + 16 x {per_box:.1f})",
        f"at {EXTRACT_TARGET} img/s: {need:.0f} TFLOP/s",
        100 * need / H100_BF16_SPEC,
        ratio_fmt="{:.0f}%",
        target="of H100 bf16 spec",
        sam_encoder_gflop=sam_enc,
        clip_gflop=clip,
        decoder_gflop_per_box=per_box,
    )
    need = TRAIN_TARGET * head_per_image / 1e3
    table.add(
        "flops: BL head training step (fwd + bwd, 16 boxes, 365 classes, counted)",
        f"{head_per_image:.1f} GFLOP/img",
        f"at {TRAIN_TARGET} img/s: {need:.0f} TFLOP/s",
        100 * need / H100_BF16_SPEC,
        ratio_fmt="{:.1f}%",
        target="of H100 bf16 spec",
        head_gflop_per_image=head_per_image,
    )
    return {"extract_gflop_per_image": per_image, "head_gflop_per_image": head_per_image}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def head_step(head: RegionSpotHead, optimizer: torch.optim.Optimizer, batch, texts: torch.Tensor) -> float:
    """One training step as RegionSpotModule + Lightning do it: forward, focal loss, backward,
    gradient clipping at 1.0, AdamW step."""
    regions = head(batch.sam, batch.clip, padding_mask=batch.padding_mask)
    loss = region_focal_loss(region_logits(regions, texts), batch.labels, batch.valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def bench_training(table: Table, bl_folder: Path, steps: int, on_the_fly_batches: int, with_sam: bool) -> dict:
    torch.manual_seed(0)
    head = RegionSpotHead.from_variant("BL").train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=2.5e-5, weight_decay=1e-4)
    texts = torch.nn.functional.normalize(torch.randn(BL["classes"], BL["text_dim"]), dim=-1)
    rng = np.random.default_rng(1)

    def in_memory_batch(size: int):
        samples = [decode_sample(bl_sample(rng, i + 1)) | {"dataset_index": 0} for i in range(size)]
        return collate_regions(samples)

    # -- cached features held in memory, and through the shard reader (RegionDataModule, 2 decoding
    # workers); the two alternate step by step so that other load falls on both alike
    batches = [in_memory_batch(16) for _ in range(2)]
    dm = RegionDataModule([str(bl_folder)], batch_size=16, workers=2, shuffle_buffer=64, seed=0)
    loader = iter(dm.train_dataloader())
    head_step(head, optimizer, batches[0], texts)  # warm-up
    head_step(head, optimizer, next(loader), texts)  # warm-up (worker start-up)
    memory_s, shard_s, images = 0.0, 0.0, 0
    for i in range(steps):
        start = now()
        head_step(head, optimizer, batches[i % 2], texts)
        memory_s += now() - start
        start = now()
        batch = next(loader)
        head_step(head, optimizer, batch, texts)
        shard_s += now() - start
        images += len(batch.meta)
    cached, from_shards = 16 * steps / memory_s, images / shard_s
    del loader
    gc.collect()

    # -- the reference's way: CLIP ViT-L/14 (and SAM ViT-B) forward on every batch, then the head
    vision = clip_vit_l14()
    small = in_memory_batch(2)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vision(pixel_values=pixels[:1])  # warm-up at batch 1 (cheaper)
    clip_s, head2_s = 0.0, 0.0
    for _ in range(on_the_fly_batches):
        start = now()
        with torch.no_grad():
            small.clip = vision(pixel_values=pixels).last_hidden_state
        clip_s += now() - start
        start = now()
        head_step(head, optimizer, small, texts)
        head2_s += now() - start
    per_image_clip = (clip_s + head2_s) / (2 * on_the_fly_batches)
    clip_fly = 1 / per_image_clip
    del vision
    gc.collect()

    table.add(
        "train: BL head, cached features in memory vs CLIP ViT-L/14 on the fly",
        f"{cached:.1f} img/s (batch 16, ~16 boxes, T 257, fp32, AdamW)",
        f"{clip_fly:.2f} img/s (CLIP fwd {1000 * clip_s / (2 * on_the_fly_batches):.0f} ms/img + head)",
        cached / clip_fly,
        target="-",
        images_per_s=cached,
        on_the_fly_images_per_s=clip_fly,
        clip_ms_per_image=1000 * clip_s / (2 * on_the_fly_batches),
    )
    table.add(
        "train: BL head through the shard reader (workers 2) vs in memory",
        f"{from_shards:.1f} img/s",
        f"{cached:.1f} img/s (in memory)",
        100 * from_shards / cached,
        ratio_fmt="{:.0f}%",
        target=">= 90%",
        met=from_shards >= 0.9 * cached,
        images_per_s=from_shards,
    )
    result = {"cached": cached, "shards": from_shards, "clip_fly": clip_fly}
    if with_sam:
        from segment_anything import sam_model_registry

        encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval()
        with torch.no_grad():
            start = now()
            encoder(torch.randn(1, 3, 1024, 1024))
            sam_s = now() - start
        del encoder
        gc.collect()
        full_fly = 1 / (per_image_clip + sam_s)
        table.add(
            "train: BL head, cached vs SAM ViT-B@1024 + CLIP ViT-L/14 on the fly",
            f"{cached:.1f} img/s",
            f"{full_fly:.3f} img/s (SAM fwd {sam_s:.1f} s/img)",
            cached / full_fly,
            ratio_fmt="{:.0f}x",
            target="-",
            on_the_fly_images_per_s=full_fly,
            sam_s_per_image=sam_s,
        )
        result["full_fly"] = full_fly
    return result


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def eval_rate(head: RegionSpotHead, shards: list[str], texts: torch.Tensor, batch_size: int, repeat: int) -> float:
    images, start = 0, now()
    for _ in range(repeat):
        for _ in regionspot_logits(head, shards, texts, torch.device("cpu"), batch_size):
            images += 1
    return images / (now() - start)


def eval_pair(head: RegionSpotHead, shards: list[str], texts: torch.Tensor, repeat: int) -> tuple[float, float]:
    """(images/s at batch 16, at batch 1), the two alternating shard by shard."""
    t16 = t1 = 0.0
    images = 0
    for _ in range(repeat):
        for shard in shards:
            start = now()
            images += sum(1 for _ in regionspot_logits(head, [shard], texts, torch.device("cpu"), 16))
            t16 += now() - start
            start = now()
            sum(1 for _ in regionspot_logits(head, [shard], texts, torch.device("cpu"), 1))
            t1 += now() - start
    return images / t16, images / t1


def bench_evaluation(table: Table, val_folder: Path, bl_eval: Path, metric_scale: float) -> dict:
    torch.manual_seed(0)
    manifest = Manifest.read(val_folder)
    head = RegionSpotHead(clip_dim=manifest.clip.vision_dim, text_dim=manifest.clip.text_dim).eval()
    texts = torch.randn(len(manifest.vocabulary), manifest.clip.text_dim)
    shards = [str(s) for s in list_shards(val_folder)]
    eval_rate(head, shards, texts, 16, 1)  # warm-up
    demo_b16, demo_b1 = eval_pair(head, shards, texts, 3)
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
    bl_b16, bl_b1 = eval_pair(bl_head, bl_shards, bl_texts, 2)
    lvis_head_s = LVIS_IMAGES / bl_b16
    table.add(
        "eval: regionspot_logits, BL-size shards (T 257, D 1024, ~16 boxes)",
        f"{bl_b16:.1f} img/s (batch 16)",
        f"{bl_b1:.1f} img/s (batch 1)",
        bl_b16 / bl_b1,
        images_per_s=bl_b16,
        batch1_images_per_s=bl_b1,
        lvis_val_head_s=lvis_head_s,
    )

    return {"demo": demo_b16, "bl": bl_b16, "lvis_head_s": lvis_head_s}


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
    full = report["images"] == bench_metrics.LVIS_VAL["images"]  # the target is for LVIS val's size
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


# ---------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    hf_logging.disable_progress_bar()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller run (about 1.5 minutes on 2 cores)")
    p.add_argument("--out", default="bench_out", help="working folder (git-ignored); reused between runs")
    p.add_argument("--images", type=int, help="demo images to extract (default 48, quick 16)")
    p.add_argument(
        "--metric-scale",
        type=float,
        help="fraction of LVIS v1 val for the metric step (default 1: full size, ~20 min, ~20 GB; quick 0.05)",
    )
    p.add_argument("--no-sam", action="store_true", help="skip SAM ViT-B's encoder on the fly (~20 s; quick skips it)")
    args = p.parse_args(argv)
    quick = args.quick
    num_images = args.images or (16 if quick else 48)
    metric_scale = args.metric_scale or (0.05 if quick else 1.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = now()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(
        f"[bench] load average {load_before[0]:.2f}; {cpu_name()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{'quick' if quick else 'default'} run into {out}/",
        flush=True,
    )

    table = Table()
    # first, while this process is small: the LVIS API's process needs ~20 GB at full size
    bench_metric_step(table, out / "metrics", metric_scale)

    data = generate_demo_dataset(out / "data", num_train=num_images, num_val=14, seed=0)
    backbones = write_tiny_backbones(out / "backbones")

    bench_extraction(table, out, data, backbones, num_images, reps=2)

    # demo shards through the real CLI code path (manifest + text cache), for loading and eval
    shards_dir = out / "shards"
    for split, n, size in (("train", num_images, max(1, num_images // 4)), ("val", 14, 7)):
        folder = shards_dir / f"{split}-{n}"
        try:
            Manifest.read(folder)
        except ShardFormatError:  # features of an older format or protocol: extract again
            shutil.rmtree(folder, ignore_errors=True)
        if not (folder / MANIFEST).is_file():
            run_extraction(
                ExtractConfig(
                    images=str(data[f"{split}_images"]),
                    annotations=str(data[f"{split}_json"]),
                    out=str(folder),
                    sam_checkpoint=str(backbones["sam_checkpoint"]),
                    clip_model=str(backbones["clip_dir"]),
                    sam_type="tiny",
                    dataset=f"demo_{split}",
                    shard_size=size,
                    batch_size=BATCH,
                    workers=0,
                    text_cache=str(out / "text_embeddings.h5"),
                )
            )
    bl_train = write_bl_shards(out / "bl_train", 64 if quick else 256)
    bl_eval = write_bl_shards(out / "bl_eval", 16 if quick else 48, shard_size=16)

    bench_loading(
        table,
        {"demo": shards_dir / f"train-{num_images}", "BL": bl_train},
        {"demo": 800 if quick else 3000, "BL": 128 if quick else 512},
    )
    bench_flops(table)
    bench_training(
        table,
        bl_train,
        steps=2 if quick else 4,
        on_the_fly_batches=1 if quick else 2,
        with_sam=not (quick or args.no_sam),
    )
    bench_evaluation(table, shards_dir / "val-14", bl_eval, metric_scale)

    total = now() - started
    load_after = os.getloadavg()
    print(
        f"\nregionspot_pl bench ({'quick' if quick else 'default'}), {cpu_name()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, {total:.0f} s in all, load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
        "ratio = ours / naive (speed-up) unless a % of a limit\n"
    )
    print(table.render())
    if load_before[0] > 0.5:
        print(
            f"\nnote: load average {load_before[0]:.1f} before the run on {os.cpu_count()} cores: other processes "
            "shared the CPU. Compared sides alternate in time, but oversubscribed threads slow many small ops "
            "(the naive loops) more than a few big ones, so speed-ups come out larger than on a quiet machine."
        )
    report = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "images": num_images,
        "metric_scale": metric_scale,
        "seconds": round(total, 1),
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
        "rows": table.rows,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten: {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
