"""Time the LVIS metric step at LVIS v1 val size with both backends, hotcoco and the LVIS API.

    .venv/bin/python scripts/bench_metrics.py                    # full LVIS v1 val size, both backends
    .venv/bin/python scripts/bench_metrics.py --scale 0.1        # 1/10 of it
    .venv/bin/python scripts/bench_metrics.py --scale 0.1 --iou-type bbox segm --backends hotcoco

Ground truth: ``scale`` x 19,809 images (640x480) and 1,203 categories (337 rare, 461 common,
405 frequent, as LVIS v1), ~12.3 boxes per image (~244K at scale 1), LVIS's federated fields
(about 4 positive and 10 negative categories per image). Detections: 300 per image, as the test
CLI writes them: each box reported under several classes (its own, the image's negatives,
random others), jittered, with random scores. Masks (segm) are the boxes' rectangles as RLE.

Both files are written as JSON under --work (kept for reruns of the same scale and seed). Each
backend then runs in a fresh process, the code path of ``python -m regionspot_pl.evaluate GT
RESULTS --metric_backend B`` (``evaluate.run_evaluate``), so that each starts from the same
memory and the ratio covers what a user waits for: the process's wall time (start-up and
imports, reading both JSON files, validation, the evaluator) and its parts. The backends'
metrics and per-class APs are compared (largest difference). Prints a table and one JSON line.

The LVIS API holds a few dicts with an entry per (image, category) pair: at full size its process
peaks at ~20 GB. With less memory available the scale is lowered to what fits (and said so), and
its process asks the kernel to pick it first should memory run out anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LVIS_VAL = {"images": 19_809, "boxes": 244_707, "rare": 337, "common": 461, "frequent": 405}
DETS_PER_IMAGE = 300
WIDTH, HEIGHT = 640, 480
BACKENDS = ("hotcoco", "lvis")
# Peak memory of the LVIS API's process at scale 1 (bbox): 22.4 GB measured; evaluation/backends.py
# has since freed the caches accumulate() does not read and shared one placeholder for the box
# polygons LVISResults would add: 15% less at scale 0.05, so ~20 GB expected at scale 1.
LVIS_API_PEAK_GB = 20.0


def synthetic_lvis(scale: float, seed: int = 0, with_masks: bool = False) -> tuple[dict, list[dict]]:
    """(GT dict, detections list) of an LVIS-val-sized problem shrunk by ``scale`` in images."""
    rng = np.random.default_rng(seed)
    freqs = ["r"] * LVIS_VAL["rare"] + ["c"] * LVIS_VAL["common"] + ["f"] * LVIS_VAL["frequent"]
    categories = [{"id": i + 1, "name": f"class_{i + 1}", "frequency": f} for i, f in enumerate(freqs)]
    # Frequent classes hold most boxes, as in LVIS.
    weight = np.array([{"r": 1.0, "c": 8.0, "f": 60.0}[f] for f in freqs])
    weight /= weight.sum()
    images, annotations, detections = [], [], []
    for image_id in range(1, max(1, round(LVIS_VAL["images"] * scale)) + 1):
        image, anns, dets = _synthetic_image(rng, image_id, weight, len(annotations), with_masks)
        images.append(image)
        annotations += anns
        detections += dets
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, detections


def _rle(box: list[float]) -> dict:
    """The [x, y, w, h] box's rectangle as a COCO RLE."""
    from pycocotools import mask as mask_utils

    r = mask_utils.frPyObjects(np.array([box], dtype=np.float64), HEIGHT, WIDTH)[0]
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _synthetic_image(
    rng: np.random.Generator, image_id: int, weight: np.ndarray, ann_ids: int, with_masks: bool
) -> tuple[dict, list[dict], list[dict]]:
    """One image's entry, its GT boxes (ids after ``ann_ids``) and its 300 detections."""
    num_cats = len(weight)
    n = max(1, int(rng.poisson(LVIS_VAL["boxes"] / LVIS_VAL["images"])))
    pos = rng.choice(num_cats, size=min(n, int(rng.integers(1, 8))), replace=False, p=weight) + 1
    labels = rng.choice(pos, size=n)
    wh = rng.uniform(8, 300, size=(n, 2))
    xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([WIDTH, HEIGHT]) - wh)
    boxes = np.concatenate([xy, wh], axis=1)
    neg = np.setdiff1d(rng.choice(num_cats, size=10, replace=False) + 1, pos)
    image = {"id": image_id, "width": WIDTH, "height": HEIGHT, "neg_category_ids": neg.tolist(),
             "not_exhaustive_category_ids": []}  # fmt: skip
    annotations = []
    for box, label in zip(boxes.tolist(), labels.tolist()):
        ann = {"id": ann_ids + len(annotations) + 1, "image_id": image_id, "category_id": int(label), "bbox": box,
               "area": box[2] * box[3], "iscrowd": 0}  # fmt: skip
        annotations.append(ann | ({"segmentation": _rle(box)} if with_masks else {}))
    # 300 (box, class) pairs: each box under its own class, the negatives, and random classes.
    box_of = rng.integers(0, n, size=DETS_PER_IMAGE)
    pool = np.concatenate([pos, neg]) if len(neg) else pos
    classes = np.where(
        rng.random(DETS_PER_IMAGE) < 0.5,
        rng.choice(pool, size=DETS_PER_IMAGE),
        rng.integers(1, num_cats + 1, size=DETS_PER_IMAGE),
    )
    classes[: min(n, DETS_PER_IMAGE)] = labels[:DETS_PER_IMAGE]
    box_of[: min(n, DETS_PER_IMAGE)] = np.arange(min(n, DETS_PER_IMAGE))
    jitter = boxes[box_of] + rng.normal(0, 3, size=(DETS_PER_IMAGE, 4)) * [1, 1, 0, 0]
    jitter[:, 2:] = np.maximum(boxes[box_of, 2:], 1.0)
    scores = np.sort(rng.random(DETS_PER_IMAGE))[::-1]
    detections = [
        {"image_id": image_id, "category_id": int(c), "bbox": box, "score": s}
        | ({"segmentation": _rle(box)} if with_masks else {})
        for box, c, s in zip(jitter.tolist(), classes.tolist(), scores.tolist())
    ]
    return image, annotations, detections


def write_inputs(folder: Path, scale: float, seed: int, with_masks: bool) -> dict:
    """GT and results JSON of :func:`synthetic_lvis` in ``folder``, reused when already there.

    Built in a child process, so that the gigabytes of Python objects behind them (at full
    size) are gone, not held by this process while the backends run.

    Returns {"gt": path, "results": path, "images", "categories", "gt_boxes", "detections",
    "build_s"} (build_s: 0 when reused).
    """
    tag = f"scale{scale:g}-seed{seed}{'-masks' if with_masks else ''}"
    paths = {name: folder / f"{tag}-{name}.json" for name in ("gt", "results", "info")}
    start = time.perf_counter()
    if not all(path.is_file() for path in paths.values()):
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            __file__,
            "--write-inputs",
            str(folder / tag),
            "--scale",
            str(scale),
            "--seed",
            str(seed),
        ] + (["--iou-type", "segm"] if with_masks else [])
        subprocess.run(cmd, check=True)
    build_s = time.perf_counter() - start
    info = json.loads(paths["info"].read_text())
    return {**info, "gt": str(paths["gt"]), "results": str(paths["results"]), "build_s": build_s}


def _write_inputs_here(prefix: str, scale: float, seed: int, with_masks: bool) -> None:
    """Child process of write_inputs: PREFIX-gt.json, PREFIX-results.json, PREFIX-info.json."""
    from regionspot_pl.utils.io import write_json_atomic

    gt, dets = synthetic_lvis(scale, seed, with_masks)
    for name, data in (("gt", gt), ("results", dets)):
        write_json_atomic(f"{prefix}-{name}.json", data, indent=None)
    info = {
        "images": len(gt["images"]),
        "categories": len(gt["categories"]),
        "gt_boxes": len(gt["annotations"]),
        "detections": len(dets),
    }
    Path(f"{prefix}-info.json").write_text(json.dumps(info))  # last: marks the set complete


def run_backend(backend: str, inputs: dict, iou_types: list[str], folder: Path) -> dict:
    """One backend in a fresh process (see :func:`worker`); adds its wall time ``wall_s``."""
    arrays = folder / f"per_class_{backend}.npz"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        backend,
        "--gt",
        inputs["gt"],
        "--results",
        inputs["results"],
        "--arrays",
        str(arrays),
        "--iou-type",
        *iou_types,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        raise RuntimeError(f"{backend} run failed with code {proc.returncode}{killed}:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall, "arrays": str(arrays)}


def worker(backend: str, gt: str, results: str, iou_types: list[str], arrays: str) -> None:
    """Child process: evaluate.run_evaluate with one backend; prints its timings as JSON."""
    try:  # should memory run out, the kernel kills this process before anyone else's
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    start = time.perf_counter()
    from regionspot_pl.evaluate import EvaluateConfig, run_evaluate

    import_s = time.perf_counter() - start
    result = run_evaluate(EvaluateConfig(gt, results, iou_types, max_dets=DETS_PER_IMAGE, metric_backend=backend))
    evaluations = result["evaluations"]
    np.savez(
        arrays, **{f"{t}_{k}": getattr(e, k) for t, e in evaluations.items() for k in ("per_class_ap", "category_ids")}
    )
    print(
        json.dumps(
            {
                "import_s": import_s,
                "load_s": result["seconds"]["load"],
                "load_gt_s": result["seconds"]["load_gt"],
                "metric_s": result["seconds"]["metrics"],
                "metrics": {t: e.metrics for t, e in evaluations.items()},
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


def _difference(a: float, b: float) -> float:
    """|a - b|, 0 when both are NaN (nothing to score on either side), inf when one is."""
    if np.isnan(a) or np.isnan(b):
        return 0.0 if np.isnan(a) and np.isnan(b) else float("inf")
    return abs(a - b)


def largest_difference(runs: dict[str, dict], iou_type: str) -> dict:
    """Largest difference between the two backends' metrics, and between their per-class APs."""
    a, b = (runs[name] for name in BACKENDS)
    ma, mb = a["metrics"][iou_type], b["metrics"][iou_type]
    pa, pb = (np.load(r["arrays"]) for r in (a, b))
    if not np.array_equal(pa[f"{iou_type}_category_ids"], pb[f"{iou_type}_category_ids"]):
        return {"metrics": max(_difference(ma[k], mb[k]) for k in ma), "per_class": float("inf")}
    ap_a, ap_b = pa[f"{iou_type}_per_class_ap"], pb[f"{iou_type}_per_class_ap"]
    return {
        "metrics": max(_difference(ma[k], mb[k]) for k in ma),
        "per_class": max(_difference(x, y) for x, y in zip(ap_a.tolist(), ap_b.tolist())),
    }


def memory_available_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB; None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def feasible_scale(scale: float, backends: list[str]) -> float:
    """``scale``, or the largest multiple of 0.05 below it whose LVIS API run fits in memory."""
    available = memory_available_gb()
    if "lvis" not in backends or available is None or LVIS_API_PEAK_GB * scale <= available:
        return scale
    fitted = max(0.01, int(available / LVIS_API_PEAK_GB * 20) / 20)
    print(
        f"[bench_metrics] note: the LVIS API needs ~{LVIS_API_PEAK_GB * scale:.0f} GB at scale {scale:g} and "
        f"{available:.1f} GB are available: running at scale {fitted:g} instead",
        flush=True,
    )
    return fitted


def bench(scale: float, iou_types: list[str], backends: list[str], folder: Path, seed: int = 0) -> dict:
    """Write the inputs, run each backend, compare. Returns the report (see main); its "scale" is
    the one run, smaller than asked when the LVIS API would not fit in memory."""
    scale = feasible_scale(scale, backends)
    inputs = write_inputs(folder, scale, seed, with_masks="segm" in iou_types)
    print(
        f"[bench_metrics] {inputs['images']} images, {inputs['categories']} categories, {inputs['gt_boxes']} GT boxes, "
        f"{inputs['detections']} detections ({os.path.getsize(inputs['results']) / 1e6:.0f} MB of results JSON)",
        flush=True,
    )
    runs, failed = {}, {}
    for backend in backends:
        try:
            runs[backend] = run_backend(backend, inputs, iou_types, folder)
        except RuntimeError as err:  # e.g. killed for memory: report it, keep the other side
            failed[backend] = str(err)
            print(f"[bench_metrics] {backend}: {err}", flush=True)
            continue
        r = runs[backend]
        print(
            f"[bench_metrics] {backend}: {r['wall_s']:.1f} s in all (imports {r['import_s']:.1f} s, reading JSON "
            f"{r['load_s']:.1f} s, metric step {r['metric_s']:.1f} s), peak {r['peak_rss_gb']:.1f} GB",
            flush=True,
        )
    report = {
        "scale": scale,
        **{k: v for k, v in inputs.items() if k not in ("gt", "results")},
        "runs": runs,
        "failed": failed,
    }
    if set(BACKENDS) <= set(runs):
        report["speedup"] = {
            "wall": runs["lvis"]["wall_s"] / runs["hotcoco"]["wall_s"],
            "metric_step": runs["lvis"]["metric_s"] / runs["hotcoco"]["metric_s"],
        }
        report["largest_difference"] = {t: largest_difference(runs, t) for t in iou_types}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scale", type=float, default=1.0, help="fraction of LVIS val's 19,809 images (default 1: full size)"
    )
    p.add_argument("--iou-type", nargs="+", default=["bbox"], choices=("bbox", "segm"))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="bench_out/metrics", help="folder for the JSON inputs (git-ignored)")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--gt", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    p.add_argument("--arrays", help=argparse.SUPPRESS)
    p.add_argument("--write-inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_inputs:
        _write_inputs_here(args.write_inputs, args.scale, args.seed, with_masks="segm" in args.iou_type)
        return 0
    if args.worker:
        worker(args.worker, args.gt, args.results, args.iou_type, args.arrays)
        return 0
    report = bench(args.scale, args.iou_type, args.backends, Path(args.work), args.seed)
    if "speedup" in report:
        print(
            f"[bench_metrics] hotcoco vs LVIS API: {report['speedup']['wall']:.1f}x end to end, "
            f"{report['speedup']['metric_step']:.1f}x on the metric step; largest difference "
            f"{json.dumps(report['largest_difference'])}"
        )
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
