"""`make demo`: RegionSpot end to end on the embedded scene set, on a CPU, in a few minutes.

Runs the real CLIs in order -- data -> tiny backbones -> extract -> fit -> test -- then scores
the same detections with shuffled class labels (the chance level), prints the table and draws
pictures with the predictor. Every stage reuses what a previous run left in demo_out/ (`--out`),
so a rerun takes seconds; `--fresh` starts over. `--quick` runs the same stages at tiny sizes in
seconds, a check that the demo runs (its head does not learn enough to beat chance, so the AP
check is left out). `--sam` and `--clip` pick the frozen pair among the tiny random models of each
family (`python -m regionspot_pl.tiny`); a pair other than the default runs in its own subfolder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from regionspot_pl.backbones.tiny import TINY_SAMS, TINY_VLMS, tiny_pair
from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.evaluation import evaluate_detections, format_metrics_table
from regionspot_pl.predict.predictor import Predictor
from regionspot_pl.predict.viz import draw_attention, draw_detections, save_grid

PY = [sys.executable, "-m"]


@dataclasses.dataclass(frozen=True)
class Pair:
    """The frozen pair the demo runs on: ``--sam_type``, ``--sam_checkpoint``, ``--clip_model``."""

    sam_type: str
    sam_checkpoint: Path
    clip_model: Path

    @classmethod
    def of(cls, sam: str, clip: str, backbones: Path) -> Pair:
        """The tiny models of these families in ``backbones`` (the folder the tiny command wrote)."""
        flags = tiny_pair(backbones, sam, clip)
        return cls(flags["sam_type"], Path(flags["sam_checkpoint"]), Path(flags["clip_model"]))

    def flags(self) -> list[str]:
        return [
            "--sam_type", self.sam_type, "--sam_checkpoint", str(self.sam_checkpoint),
            "--clip_model", str(self.clip_model),
        ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The demo's sizes: the default run, or ``--quick``'s (the same stages, in seconds)."""

    num_train: int = 1000
    num_val: int = 120
    loader_workers: int = 2
    fit_flags: tuple[str, ...] = ()  # on top of the demo preset
    pictures: int = 6  # val images drawn with their predictions
    attention_images: int = 24  # val images whose attention inside the box is averaged


QUICK = Sizes(
    num_train=8, num_val=14, loader_workers=0, pictures=1, attention_images=1,
    fit_flags=(
        "--trainer.max_steps", "2", "--trainer.val_every", "2", "--data.workers", "0",
        "--trainer.log_every_n_steps", "1",
    ),
)  # fmt: skip


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


def pictures(data: dict, head: Path, pair: Pair, out: Path, sizes: Sizes) -> tuple[list[Path], str]:
    """Predictions on a few val images, and one region's cross-attention over the CLIP map in
    each decoder layer (the paper's Figure 4); the share of attention inside the query's box."""
    val = json.loads(Path(data["val_json"]).read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    predictor = Predictor.from_pretrained(
        head=head, sam_type=pair.sam_type, sam_checkpoint=pair.sam_checkpoint, clip_model=pair.clip_model,
        text_cache=out / "text_embeddings.h5",
    )  # fmt: skip
    panels, attention, shares, uniform = [], None, [], []
    for k, image in enumerate(val["images"][: sizes.attention_images]):
        anns = [a for a in val["annotations"] if a["image_id"] == image["id"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        pixels = np.array(Image.open(Path(data["val_images"]) / image["file_name"]).convert("RGB"))
        predictor.set_image(pixels)
        share, chance = attention_in_box(predictor, pixels, boxes)
        shares.append(share)
        uniform.append(chance)
        if k >= sizes.pictures:
            continue
        panels.append(prediction_panel(predictor, pixels, boxes, [names[a["category_id"]] for a in anns], names))
        if attention is None:  # one region, its query's attention in each decoder layer
            attention = [
                draw_attention(
                    pixels, boxes[0], predictor.attention_maps(boxes[:1], layer=i)[0], title=f"decoder layer {i + 1}"
                )
                for i in range(len(predictor.head.decoder.layers))
            ]
    grid = save_grid(panels, out / "predictions.png", cols=3)
    save_grid(attention, out / "attention.png", cols=len(attention))
    per_layer = np.concatenate(shares, axis=1).mean(1)
    routing = (
        ", ".join(f"layer {i + 1} {100 * v:.0f}%" for i, v in enumerate(per_layer))
        + f" (uniform attention: {100 * np.concatenate(uniform).mean():.0f}%)"
    )
    return [grid, out / "attention.png"], routing


def prediction_panel(predictor: Predictor, pixels: np.ndarray, boxes: list, gt_labels: list[str], names: dict):
    """The image with each box's top class and score, and its true class."""
    preds = predictor.predict(boxes, [names[i] for i in sorted(names)], topk=1)
    return draw_detections(
        pixels,
        boxes,
        [p["labels"][0] for p in preds],
        [p["scores"][0] for p in preds],
        # no mask overlay: the demo's SAM is random, so its masks are noise (see README)
        gt_labels=gt_labels,
    )


def extract_command(data: dict, split: str, out: Path, pair: Pair, workers: int) -> list[str]:
    return PY + [
        "regionspot_pl.extract",
        "--images", str(data[f"{split}_images"]), "--annotations", str(data[f"{split}_json"]),
        "--out", str(out / "shards" / split), "--dataset", f"demo_{split}", *pair.flags(),
        "--shard_size", "50", "--batch_size", "8", "--workers", str(workers),
        "--text_cache", str(out / "text_embeddings.h5"),
    ]  # fmt: skip


def fit_command(data: dict, out: Path, sizes: Sizes) -> list[str]:
    """fit with the demo preset (``fit --stage demo``), its paths pointed at ``out``."""
    return PY + [
        "regionspot_pl.fit", "--stage", "demo", "--out", str(out / "run"),
        "--data.train_shards", f"[{out / 'shards' / 'train'}]", "--data.val_shards", str(out / "shards" / "val"),
        "--data.val_annotations", str(data["val_json"]), *sizes.fit_flags,
    ]  # fmt: skip


def test_command(data: dict, out: Path, head: Path) -> list[str]:
    return PY + [
        "regionspot_pl.test", "--shards", str(out / "shards" / "val"), "--annotations", str(data["val_json"]),
        "--head", str(head), "--out", str(out / "test"), "--device", "cpu",
        "--text_cache", str(out / "text_embeddings.h5"),
    ]  # fmt: skip


def run_stages(out: Path, sizes: Sizes, families: tuple[str, str], times: dict) -> tuple[dict, Path, Pair]:
    """data -> tiny backbones -> extract -> fit -> test, each reusing what a previous run left.
    Returns (the demo set's paths, the trained head, the frozen pair)."""
    t = time.time()
    data = generate_demo_dataset(out / "data", num_train=sizes.num_train, num_val=sizes.num_val, seed=0)
    times["data"] = time.time() - t
    backbones = out / "backbones"
    pair = Pair.of(*families, backbones)
    times["backbones"] = stage("tiny backbones", PY + ["regionspot_pl.tiny", str(backbones)], pair.clip_model)
    times["extract"] = 0.0
    for split in ("train", "val"):
        # extraction resumes by itself: a rerun finds every shard done and returns at once
        times["extract"] += stage(f"extract {split}", extract_command(data, split, out, pair, sizes.loader_workers))
    head = out / "run" / "head.pt"
    times["fit"] = stage("fit", fit_command(data, out, sizes), head)
    times["test"] = stage("test", test_command(data, out, head), out / "test" / "metrics.json")
    return data, head, pair


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--num-train", type=int, help=f"train images (default {Sizes.num_train}, quick {QUICK.num_train})")
    p.add_argument("--num-val", type=int, help=f"val images (default {Sizes.num_val}, quick {QUICK.num_val})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same stages at tiny sizes (8 train images, 2 steps, 1 picture): a check that the demo runs, "
        "in seconds; it does not train a head that beats chance, so the AP check is skipped",
    )
    p.add_argument("--sam", choices=sorted(TINY_SAMS), default="sam", help="the localization model (default sam)")
    p.add_argument("--clip", choices=sorted(TINY_VLMS), default="clip", help="the vision-language model")
    args = p.parse_args(argv)
    if (args.sam, args.clip) != ("sam", "clip"):  # shards and heads of two pairs never share a folder
        args.out = args.out / f"{args.sam}+{args.clip}"
    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(
        sizes, num_train=args.num_train or sizes.num_train, num_val=args.num_val or sizes.num_val
    )
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    started, times = time.time(), {}
    data, head, pair = run_stages(args.out, sizes, (args.sam, args.clip), times)
    metrics = json.loads((args.out / "test" / "metrics.json").read_text())
    chance = chance_level(Path(data["val_json"]), args.out / "test" / "detections_bbox.json")
    t = time.time()
    images, routing = pictures(data, head, pair, args.out, sizes)
    times["pictures"] = time.time() - t

    print(f"\nRegionSpot demo ({args.sam} + {args.clip}), val split (box and mask AP, %):")
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
    print(f"cross-attention inside the query's box, {sizes.attention_images} val images: {routing}")
    print("pictures: " + ", ".join(str(i) for i in images))
    if not args.quick and metrics["bbox"]["AP"] < 2 * chance["AP"]:
        print(
            f"error: box AP {metrics['bbox']['AP']:.3f} is not far above chance {chance['AP']:.3f}: "
            "the head did not learn",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
