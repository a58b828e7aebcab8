"""CPU time per image of extraction's host path, at real image sizes (part of `make bench`).

    python scripts/bench_host.py [--images 24] [--boxes 16] [--quick]

Everything extraction does on the host for one image, stage by stage, in one process: JPEG
decode (``read_image``), detectron2's test resize, SAM's longest-side resize (both PIL, in loader
workers), preparing the uint8 tensors for the transfer, RLE-encoding the box masks at the
original size (evaluation splits only; training sets store no masks), and encoding + writing the
shard sample (BL size: 257 x 1024 float16 CLIP tokens). The GPU goal of 300 images/s needs
``total ms x 300 / 1000`` cores for this work; the target is at most 30 ms per image (9 cores).
Images are synthetic JPEGs at typical dataset sizes (COCO/LVIS 640 x 480, Objects365 ~1024 x 768).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionspot_pl.backbones.image import (
    masks_to_original,
    read_image,
    resize_for_backbones,
    resized_shape,
)
from regionspot_pl.backbones.sam import SamTransform
from regionspot_pl.cache.shards import AtomicShardWriter, encode_sample
from regionspot_pl.utils.io import masks_to_rle

SAM_MEAN = torch.tensor([123.675, 116.28, 103.53])
SAM_STD = torch.tensor([58.395, 57.12, 57.375])
SIZES = {"coco 640x480": (480, 640), "o365 1024x768": (768, 1024)}


def synthetic_jpeg(folder: Path, index: int, hw: tuple[int, int]) -> Path:
    """A photo-like JPEG (smooth gradients + texture noise: JPEG decode cost depends on it)."""
    rng = np.random.default_rng(index)
    h, w = hw
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xs / rng.uniform(20, 90) + c) * np.cos(ys / rng.uniform(20, 90)) for c in range(3)], -1)
    pixels = np.clip(127 + 90 * base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
    path = folder / f"{index:04d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path


def box_masks(hw: tuple[int, int], resized: tuple[int, int], n: int, rng: np.random.Generator) -> torch.Tensor:
    """n elliptic masks at the resized size, as SAM's thresholded masks come out."""
    h, w = resized
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, h / 3), rng.uniform(10, w / 3)
        out[i] = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1
    return out


def time_stages(paths: list[Path], hw: tuple[int, int], boxes: int, out: Path) -> dict[str, float]:
    """Mean ms per image of each host stage over ``paths``."""
    sam = SamTransform(1024, SAM_MEAN, SAM_STD)
    rng = np.random.default_rng(0)
    clock = {
        k: 0.0
        for k in (
            "decode",
            "resize 800/1333",
            "SAM resize 1024",
            "transfer prep",
            "mask upsample",
            "mask RLE",
            "shard encode+write",
        )
    }
    writer = AtomicShardWriter(out / "bench-r000-000000.tar")
    masks = box_masks(hw, resized_shape(*hw), boxes, rng)
    clip_tokens = rng.standard_normal((257, 1024)).astype(np.float16)
    for i, path in enumerate(paths):
        t0 = time.perf_counter()
        image, _ = read_image(path, hw)
        t1 = time.perf_counter()
        resized = resize_for_backbones(image)
        t2 = time.perf_counter()
        sam_image = sam.resize(resized)
        t3 = time.perf_counter()
        clip_image = torch.from_numpy(resized).permute(2, 0, 1).contiguous()
        batch = [sam_image.contiguous(), clip_image]  # what crosses to the device, as uint8
        t4 = time.perf_counter()
        full = masks_to_original(masks, hw)
        t5 = time.perf_counter()
        rles = masks_to_rle(full)
        t6 = time.perf_counter()
        tokens = rng.standard_normal((boxes, 256)).astype(np.float32)
        xyxy = np.tile(np.array([[10, 10, 200, 200]], np.float32), (boxes, 1))
        writer.write(
            encode_sample(
                i,
                tokens,
                xyxy,
                np.zeros(boxes, np.int64),
                np.ones(boxes, np.float32),
                clip_tokens,
                {"file_name": path.name, "width": hw[1], "height": hw[0], "dataset": "bench", "masks": rles},
                iou=np.ones(boxes, np.float32),
            )
        )
        t7 = time.perf_counter()
        for key, dt in zip(clock, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            clock[key] += dt
        del batch
    writer.abort()
    return {k: 1000 * v / len(paths) for k, v in clock.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, help="images per size (default 24, quick 2)")
    p.add_argument("--boxes", type=int, default=16, help="boxes per image (O365 averages 15.8)")
    p.add_argument(
        "--quick", action="store_true", help="2 images per size: a check that it runs (make bench ARGS=--quick)"
    )
    args = p.parse_args(argv)
    args.images = args.images or (2 if args.quick else 24)
    torch.set_num_threads(1)  # one loader worker's view: one core per image
    print(f"host path per image, one core, {args.boxes} boxes/image (ms; torch threads 1)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, hw in SIZES.items():
            paths = [synthetic_jpeg(folder, i, hw) for i in range(args.images)]
            stages = time_stages(paths, hw, args.boxes, folder)
            no_masks = sum(v for k, v in stages.items() if not k.startswith("mask"))
            total = sum(stages.values())
            print(f"\n{name} (resized to {resized_shape(*hw)[1]}x{resized_shape(*hw)[0]}):")
            for k, v in stages.items():
                print(f"  {k:<20} {v:7.2f}")
            print(f"  {'total, with masks':<20} {total:7.2f}  -> {total * 0.3:.1f} cores for 300 img/s")
            print(
                f"  {'total, no masks':<20} {no_masks:7.2f}  -> {no_masks * 0.3:.1f} cores for 300 img/s "
                f"({'within' if no_masks <= 30 else 'over'} the 30 ms target)"
            )


if __name__ == "__main__":
    main()
