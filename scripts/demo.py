"""`make demo`: RegionSpot end to end on the embedded scene set, on a CPU, in a few minutes.

Runs the real CLIs in order -- data -> tiny backbones -> extract -> fit -> test -- then scores
the same detections with shuffled class labels (the chance level), prints the table and draws
pictures with the predictor. Every stage reuses what a previous run left in demo_out/, so a
rerun takes seconds; `--fresh` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.evaluation import evaluate_detections, format_metrics_table
from regionspot_pl.predict.predictor import Predictor
from regionspot_pl.predict.viz import draw_attention, draw_detections, save_grid

OUT = Path("demo_out")
PY = [sys.executable, "-m"]


def stage(name: str, cmd: list[str], done: Path | None = None) -> float:
    """Run one CLI unless its output exists; returns seconds spent."""
    if done is not None and done.exists():
        print(f"[demo] {name}: reusing {done}")
        return 0.0
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def chance_level(gt: Path, detections: Path, seed: int = 0) -> dict:
    """The same evaluation with each detection's class replaced through a random permutation."""
    results = json.loads(detections.read_text())
    categories = sorted({c["id"] for c in json.loads(gt.read_text())["categories"]})
    perm = dict(zip(categories, np.random.default_rng(seed).permutation(categories).tolist()))
    shuffled = [{**r, "category_id": perm[r["category_id"]]} for r in results]
    return evaluate_detections(gt, shuffled, iou_type="bbox")


def attention_in_box(
    predictor: Predictor, pixels: np.ndarray, boxes: list[list[float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Share of each box query's patch attention on the patches its box covers, [layers, N],
    and the share uniform attention would give, [N]."""
    grid, (height, width) = predictor.clip_grid, pixels.shape[:2]
    inside = np.zeros((len(boxes), grid, grid), bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        rows = slice(int(y1 / height * grid), int(np.ceil(y2 / height * grid)))
        cols = slice(int(x1 / width * grid), int(np.ceil(x2 / width * grid)))
        inside[i, rows, cols] = True
    shares = []
    for layer in range(len(predictor.head.decoder.layers)):
        patches = predictor.attention_maps(boxes, layer=layer)[:, 1:].numpy().reshape(len(boxes), grid, grid)
        shares.append((patches * inside).sum((1, 2)) / patches.sum((1, 2)))
    return np.stack(shares), inside.mean((1, 2))


def pictures(data: dict, head: Path, backbones: Path, n: int = 6) -> tuple[list[Path], str]:
    """Predictions on a few val images, and one region's cross-attention over the CLIP map in
    each decoder layer (the paper's Figure 4)."""
    val = json.loads(Path(data["val_json"]).read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    vocabulary = [names[i] for i in sorted(names)]
    predictor = Predictor.from_pretrained(
        head=head,
        sam_type="tiny",
        sam_checkpoint=backbones / "sam_tiny.pth",
        clip_model=backbones / "clip_tiny",
        text_cache=OUT / "text_embeddings.h5",
    )
    panels, attention, shares, uniform = [], None, [], []
    for k, image in enumerate(val["images"][:24]):
        anns = [a for a in val["annotations"] if a["image_id"] == image["id"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        path = Path(data["val_images"]) / image["file_name"]
        pixels = np.array(Image.open(path).convert("RGB"))
        predictor.set_image(pixels)
        share, chance = attention_in_box(predictor, pixels, boxes)
        shares.append(share)
        uniform.append(chance)
        if k >= n:
            continue
        preds = predictor.predict(boxes, vocabulary, topk=1)
        panels.append(
            draw_detections(
                pixels,
                boxes,
                [p["labels"][0] for p in preds],
                [p["scores"][0] for p in preds],
                # no mask overlay: the demo's SAM is random, so its masks are noise (see README)
                gt_labels=[names[a["category_id"]] for a in anns],
            )
        )
        if attention is None:  # one region, its query's attention in each decoder layer
            attention = [
                draw_attention(
                    pixels, boxes[0], predictor.attention_maps(boxes[:1], layer=i)[0], title=f"decoder layer {i + 1}"
                )
                for i in range(len(predictor.head.decoder.layers))
            ]
    grid = save_grid(panels, OUT / "predictions.png", cols=3)
    save_grid(attention, OUT / "attention.png", cols=len(attention))
    per_layer = np.concatenate(shares, axis=1).mean(1)
    routing = (
        ", ".join(f"layer {i + 1} {100 * v:.0f}%" for i, v in enumerate(per_layer))
        + f" (uniform attention: {100 * np.concatenate(uniform).mean():.0f}%)"
    )
    return [grid, OUT / "attention.png"], routing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete demo_out/ first")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=120)
    args = p.parse_args(argv)
    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    started = time.time()
    times = {}

    t = time.time()
    data = generate_demo_dataset(OUT / "data", num_train=args.num_train, num_val=args.num_val, seed=0)
    times["data"] = time.time() - t
    backbones = OUT / "backbones"
    times["backbones"] = stage(
        "tiny backbones", PY + ["regionspot_pl.tiny", str(backbones)], backbones / "sam_tiny.pth"
    )
    times["extract"] = 0.0
    for split in ("train", "val"):
        # extraction resumes by itself: a rerun finds every shard done and returns at once
        times["extract"] += stage(
            f"extract {split}",
            PY
            + [
                "regionspot_pl.extract",
                "--images",
                str(data[f"{split}_images"]),
                "--annotations",
                str(data[f"{split}_json"]),
                "--out",
                str(OUT / "shards" / split),
                "--dataset",
                f"demo_{split}",
                "--sam_type",
                "tiny",
                "--sam_checkpoint",
                str(backbones / "sam_tiny.pth"),
                "--clip_model",
                str(backbones / "clip_tiny"),
                "--shard_size",
                "50",
                "--batch_size",
                "8",
                "--workers",
                "2",
                "--text_cache",
                str(OUT / "text_embeddings.h5"),
            ],
        )
    head = OUT / "run" / "head.pt"
    times["fit"] = stage("fit", PY + ["regionspot_pl.fit", "--stage", "demo"], head)
    test_out = OUT / "test"
    times["test"] = stage(
        "test",
        PY
        + [
            "regionspot_pl.test",
            "--shards",
            str(OUT / "shards" / "val"),
            "--annotations",
            str(data["val_json"]),
            "--head",
            str(head),
            "--out",
            str(test_out),
            "--device",
            "cpu",
            "--text_cache",
            str(OUT / "text_embeddings.h5"),
        ],
        test_out / "metrics.json",
    )

    metrics = json.loads((test_out / "metrics.json").read_text())
    chance = chance_level(Path(data["val_json"]), test_out / "detections_bbox.json")
    t = time.time()
    images, routing = pictures(data, head, backbones)
    times["pictures"] = time.time() - t

    print("\nRegionSpot demo, val split (box and mask AP, %):")
    print(
        format_metrics_table(
            {"bbox": metrics["bbox"], "segm": metrics.get("segm") or {}, "bbox, shuffled labels (chance)": chance}
        )
    )
    print(
        "\nseconds per stage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; total {time.time() - started:.0f}"
    )
    print(f"cross-attention inside the query's box, 24 val images: {routing}")
    print("pictures: " + ", ".join(str(i) for i in images))
    if metrics["bbox"]["AP"] < 2 * chance["AP"]:
        print(
            f"error: box AP {metrics['bbox']['AP']:.3f} is not far above chance {chance['AP']:.3f}: "
            "the head did not learn",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
