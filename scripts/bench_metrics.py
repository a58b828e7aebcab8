"""Time the metric step of ``python -m regionspot_pl.test`` on an LVIS-val-sized synthetic input.

    .venv/bin/python scripts/bench_metrics.py --scale 0.1            # 1/10 of LVIS v1 val
    .venv/bin/python scripts/bench_metrics.py --scale 1 --iou-type bbox segm

Ground truth: ``scale`` x 19,809 images (640x480) and 1,203 categories (337 rare, 461 common,
405 frequent, as LVIS v1), ~12.3 boxes per image (~244K at scale 1), LVIS's federated fields
(about 4 positive and 10 negative categories per image). Detections: 300 per image, as the test
CLI writes them: each box reported under several classes (its own, the image's negatives,
random others), jittered, with random scores. Masks (segm) are the boxes' rectangles as RLE.
Prints one JSON line: sizes, seconds of ``evaluate_detections`` per IoU type (with the garbage
collector paused, as the test CLI runs it; --keep-gc to compare), peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time

import numpy as np

from regionspot_pl.evaluation import evaluate_detections
from regionspot_pl.test import gc_paused

LVIS_VAL = {"images": 19_809, "boxes": 244_707, "rare": 337, "common": 461, "frequent": 405}
DETS_PER_IMAGE = 300
WIDTH, HEIGHT = 640, 480


def synthetic_lvis(scale: float, seed: int = 0, with_masks: bool = False) -> tuple[dict, list[dict]]:
    """(GT dict, detections list) of an LVIS-val-sized problem shrunk by ``scale`` in images."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    freqs = ["r"] * LVIS_VAL["rare"] + ["c"] * LVIS_VAL["common"] + ["f"] * LVIS_VAL["frequent"]
    num_cats = len(freqs)
    categories = [{"id": i + 1, "name": f"class_{i + 1}", "frequency": f} for i, f in enumerate(freqs)]
    # Frequent classes hold most boxes, as in LVIS.
    weight = np.array([{"r": 1.0, "c": 8.0, "f": 60.0}[f] for f in freqs])
    weight /= weight.sum()
    num_images = max(1, round(LVIS_VAL["images"] * scale))
    mean_boxes = LVIS_VAL["boxes"] / LVIS_VAL["images"]

    def rle(box: list[float]) -> dict:
        r = mask_utils.frPyObjects(np.array([box], dtype=np.float64), HEIGHT, WIDTH)[0]  # [x, y, w, h] -> rectangle
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        n = max(1, int(rng.poisson(mean_boxes)))
        pos = rng.choice(num_cats, size=min(n, int(rng.integers(1, 8))), replace=False, p=weight) + 1
        labels = rng.choice(pos, size=n)
        wh = rng.uniform(8, 300, size=(n, 2))
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([WIDTH, HEIGHT]) - wh)
        boxes = np.concatenate([xy, wh], axis=1)
        neg = np.setdiff1d(rng.choice(num_cats, size=10, replace=False) + 1, pos)
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "neg_category_ids": neg.tolist(),
                       "not_exhaustive_category_ids": []})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label), "bbox": box,
                   "area": box[2] * box[3], "iscrowd": 0}
            if with_masks:
                ann["segmentation"] = rle(box)
            annotations.append(ann)
        # 300 (box, class) pairs: each box under its own class, the negatives, and random classes.
        box_of = rng.integers(0, n, size=DETS_PER_IMAGE)
        pool = np.concatenate([pos, neg]) if len(neg) else pos
        classes = np.where(rng.random(DETS_PER_IMAGE) < 0.5, rng.choice(pool, size=DETS_PER_IMAGE),
                           rng.integers(1, num_cats + 1, size=DETS_PER_IMAGE))
        classes[: min(n, DETS_PER_IMAGE)] = labels[: DETS_PER_IMAGE]
        box_of[: min(n, DETS_PER_IMAGE)] = np.arange(min(n, DETS_PER_IMAGE))
        jitter = boxes[box_of] + rng.normal(0, 3, size=(DETS_PER_IMAGE, 4)) * [1, 1, 0, 0]
        jitter[:, 2:] = np.maximum(boxes[box_of, 2:], 1.0)
        scores = np.sort(rng.random(DETS_PER_IMAGE))[::-1]
        for box, c, s in zip(jitter.tolist(), classes.tolist(), scores.tolist()):
            det = {"image_id": image_id, "category_id": int(c), "bbox": box, "score": s}
            if with_masks:
                det["segmentation"] = rle(box)
            detections.append(det)
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.1, help="fraction of LVIS val's 19,809 images (1 = full size)")
    p.add_argument("--iou-type", nargs="+", default=["bbox"], choices=("bbox", "segm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-gc", action="store_true", help="leave the garbage collector on (the CLI pauses it)")
    args = p.parse_args()

    start = time.perf_counter()
    gt, dets = synthetic_lvis(args.scale, args.seed, with_masks="segm" in args.iou_type)
    report = {"scale": args.scale, "gc": "on" if args.keep_gc else "paused", "images": len(gt["images"]), "categories": len(gt["categories"]),
              "gt_boxes": len(gt["annotations"]), "detections": len(dets),
              "build_s": round(time.perf_counter() - start, 1)}
    for iou_type in args.iou_type:
        start = time.perf_counter()
        with contextlib.nullcontext() if args.keep_gc else gc_paused():
            metrics = evaluate_detections(gt, dets, iou_type=iou_type, max_dets=DETS_PER_IMAGE)
        report[f"{iou_type}_s"] = round(time.perf_counter() - start, 1)
        report[f"{iou_type}_AP"] = round(metrics["AP"], 4)
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
