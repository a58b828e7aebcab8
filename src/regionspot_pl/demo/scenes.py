"""Synthetic LVIS-style scene set for the demo: coloured, textured shapes on cluttered backgrounds.

Nothing is downloaded: ``generate_demo_dataset`` draws every image with numpy/PIL from a seed and
writes a COCO-format dataset carrying LVIS's extra fields, so the whole pipeline (extraction ->
training -> federated LVIS evaluation) can run end to end on tiny random backbones.

Layout written under ``out_dir``::

    images/train/<12-digit image id>.jpg   # ``file_name`` is relative to images/<split>/
    images/val/<12-digit image id>.jpg
    annotations/train.json                 # COCO + LVIS fields; loads with COCO and lvis.LVIS
    annotations/val.json
    vocabulary.txt                         # class names, one a line, in category-id order
    params.json                            # generation parameters, written last (skip marker)

Design choices (why):
- A category is a (shape, colour, texture) triple, e.g. "red striped triangle". Each shape and each
  colour is shared by several categories, so no single cue names a class: the head has to combine
  shape, colour and texture, which a CLIP map carries at patch level.
- Train category frequencies follow a log-linear (Zipf-like) quota, so the rarest classes appear in
  only a handful of train images, as LVIS's rare classes do. ``frequency`` is then *counted* from
  the written train annotations with LVIS's thresholds (rare <= 10 images, common <= 100) at the
  default 600 train images, scaled linearly with the train-set size otherwise.
- Val is balanced: every class gets about the same number of images, so APr is measured on enough
  instances to mean something.
- Every object is annotated, so each image lists every absent class in ``neg_category_ids``. LVIS
  evaluation is federated; without negatives random scores reach a far too high AP (0.43 for
  random scores on a scene set without negatives, 0.13 with every absent class listed).
- Boxes, areas and RLE masks describe the *visible* part of each object (as COCO/LVIS do); the
  placement keeps at least ``_MIN_VISIBLE`` of every object visible.
- Image ids: train ``1..num_train``, val ``1_000_001..``; unique across splits so caches keyed by
  image id never collide. Categories have ids ``1..C`` and are identical in both files (counts and
  frequencies are those of train, as in LVIS v1).
"""

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..config import Command, run_command
from ..errors import RegionSpotError
from ..utils.checks import Range, check_settings
from ..utils.io import masks_to_rle, write_json_atomic
from .categories import Category, demo_categories, frequency_of
from .drawing import render_image

# Bump when the drawing or sampling changes, so that stale generated sets are redrawn.
GENERATOR_VERSION = 1
VAL_ID_OFFSET = 1_000_000
_MIN_OBJECTS, _MAX_DISTINCT, _MAX_OBJECTS = 3, 6, 8  # per image: classes (min/max), instances (max)
_JPEG_QUALITY = 92


class DemoDataError(RegionSpotError, ValueError):
    """Demo set sizes that cannot hold every class, or images too small to draw on."""


# A fixed, seed-independent shuffle decides which classes are frequent, common and rare, so the
# class list and its long tail stay the same whatever ``seed`` draws the scenes.
_RANK_SEED = 20231103


# ----------------------------------------------------------------------------- sampling


def _train_quotas(num_train: int, num_cats: int) -> np.ndarray:
    """Target train-image count per class (index = category id - 1): log-linear long tail."""
    qmax = max(2.0, 0.6 * num_train)
    qmin = max(1.0, num_train / 300)
    tail = np.exp(np.linspace(math.log(qmax), math.log(qmin), num_cats))
    ranks = np.random.default_rng(_RANK_SEED).permutation(num_cats)
    return np.clip(np.round(tail[ranks]), 1, num_train).astype(np.int64)


def _add_repeats(rng: np.random.Generator, distinct: list[list[int]]) -> list[list[int]]:
    """Give some classes a second instance in the same image (LVIS images hold repeats too)."""
    plans = []
    for cids in distinct:
        plan = list(cids)
        for cid in cids:
            if len(plan) < _MAX_OBJECTS and rng.random() < 0.2:
                plan.append(cid)
        plans.append([plan[i] for i in rng.permutation(len(plan))])  # random z-order
    return plans


def _plan_train(rng: np.random.Generator, num_images: int, cat_ids: list[int]) -> list[list[int]]:
    """Classes per train image, meeting the long-tail quotas with 3..6 classes per image."""
    quotas = _train_quotas(num_images, len(cat_ids))
    assigned: list[list[int]] = [[] for _ in range(num_images)]
    room = np.full(num_images, _MAX_DISTINCT, np.float64)
    # Rarest first: if a small set runs out of room, it is the head classes that fall short.
    for k in np.argsort(quotas, kind="stable"):
        n = min(int(quotas[k]), int((room > 0).sum()))
        if n == 0:
            break
        # Weighting by free room spreads classes evenly, so images end up with similar counts.
        chosen = rng.choice(num_images, size=n, replace=False, p=room / room.sum())
        for i in chosen:
            assigned[i].append(cat_ids[k])
        room[chosen] -= 1
    # Top up thin images from the head of the tail only, so rare classes stay rare.
    head = [cat_ids[k] for k in np.argsort(-quotas, kind="stable")[: max(1, len(cat_ids) // 4)]]
    for cids in assigned:
        while len(cids) < _MIN_OBJECTS:
            options = [c for c in head if c not in cids] or [c for c in cat_ids if c not in cids]
            cids.append(options[int(rng.integers(len(options)))])
    return _add_repeats(rng, assigned)


def _plan_val(rng: np.random.Generator, num_images: int, cat_ids: list[int]) -> list[list[int]]:
    """Classes per val image, balanced: each image takes the classes seen least so far."""
    counts = np.zeros(len(cat_ids), np.int64)
    assigned = []
    for _ in range(num_images):
        n = int(rng.integers(_MIN_OBJECTS, _MAX_DISTINCT + 1))
        order = np.lexsort((rng.random(len(cat_ids)), counts))[:n]
        counts[order] += 1
        assigned.append([cat_ids[k] for k in sorted(order)])
    return _add_repeats(rng, assigned)


# ----------------------------------------------------------------------------- writing


def _write_split(
    split: str,
    plans: list[list[int]],
    out_dir: Path,
    size: int,
    seed: int,
    cats: dict[int, Category],
    id_offset: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Render and save a split's images; return its COCO image and annotation records."""
    img_dir = out_dir / "images" / split
    if img_dir.exists():
        shutil.rmtree(img_dir)  # a re-generation must not leave images of an older set behind
    img_dir.mkdir(parents=True)
    all_ids = sorted(cats)
    split_key = 0 if split == "train" else 1
    images, anns = [], []
    for i, plan in enumerate(plans):
        image_id = id_offset + i + 1
        # One generator per image: a scene depends only on (seed, split, index) and its plan.
        rng = np.random.default_rng([seed, split_key, i])
        pixels, labels, placed = render_image(rng, size, plan, cats)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(img_dir / file_name, quality=_JPEG_QUALITY, subsampling=0)
        present = set()
        for j, obj in enumerate(placed, start=1):
            mask = labels == j
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": obj.category_id,
                    "bbox": [x0, y0, w, h],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": masks_to_rle(mask[None])[0],
                }
            )
            present.add(obj.category_id)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": size,
                "height": size,
                # Every object is annotated, so every absent class is a verified negative.
                "neg_category_ids": [c for c in all_ids if c not in present],
                "not_exhaustive_category_ids": [],
            }
        )
    return images, anns


def _category_records(cats: dict[int, Category], train_anns: list[dict], num_train: int) -> list[dict[str, Any]]:
    """Category records with image/instance counts and frequency counted on the train split."""
    image_sets: dict[int, set[int]] = {c: set() for c in cats}
    instances = dict.fromkeys(cats, 0)
    for a in train_anns:
        image_sets[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    records = []
    for cid, cat in sorted(cats.items()):
        image_count = len(image_sets[cid])
        records.append(
            {
                "id": cid,
                "name": cat.name,
                "synset": f"{cat.name.replace(' ', '_')}.n.01",
                "synonyms": [cat.name],
                "def": f"a {cat.colour} {cat.shape} with a {cat.texture} surface (synthetic)",
                "frequency": frequency_of(image_count, num_train),
                "image_count": image_count,
                "instance_count": instances[cid],
                "shape": cat.shape,
                "colour": cat.colour,
                "texture": cat.texture,
            }
        )
    return records


def _paths(out_dir: Path) -> dict[str, Path]:
    return {
        "root": out_dir,
        "train_images": out_dir / "images" / "train",
        "val_images": out_dir / "images" / "val",
        "train_json": out_dir / "annotations" / "train.json",
        "val_json": out_dir / "annotations" / "val.json",
        "vocabulary": out_dir / "vocabulary.txt",
        "params": out_dir / "params.json",
    }


def _dump(obj: Any, path: Path) -> None:
    write_json_atomic(path, obj, indent=None)


@dataclass
class DemoConfig:
    """The settings of ``python -m regionspot_pl.demo.scenes`` (the defaults of generate_demo_dataset)."""

    out_dir: str
    """folder to write the scene set into"""
    num_train: Annotated[int, Range(1)] = 600
    """training images"""
    num_val: Annotated[int, Range(1)] = 120
    """validation images (enough that every class is in val)"""
    image_size: Annotated[int, Range(64)] = 256
    """side of the square images, in pixels"""
    seed: int = 0
    """seed of the scenes"""
    force: bool = False
    """redraw even if already generated"""
    preview: bool = False
    """also write OUT_DIR/preview.png"""

    def __post_init__(self) -> None:
        check_settings(self)


def generate_demo_dataset(
    out_dir: str | Path,
    num_train: int = DemoConfig.num_train,
    num_val: int = DemoConfig.num_val,
    image_size: int = DemoConfig.image_size,
    seed: int = DemoConfig.seed,
    force: bool = DemoConfig.force,
) -> dict[str, Path]:
    """Write the demo scene set under ``out_dir`` (see the module docstring); return its paths.

    Keys: root, train_images, val_images (image folders; ``file_name`` is relative to them),
    train_json, val_json, vocabulary, params. Re-running with the same parameters is a no-op
    (``params.json`` is written last and compared first) unless ``force``.
    """
    out = Path(out_dir)
    paths = _paths(out)
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
    }
    if not force and _is_complete(paths, params):
        return paths
    cats = {c.id: c for c in demo_categories()}
    _check_sizes(num_train, num_val, image_size, len(cats))
    paths["params"].unlink(missing_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    ids = sorted(cats)
    plan_rng = np.random.default_rng([seed, 2])
    train_plans = _plan_train(plan_rng, num_train, ids)
    val_plans = _plan_val(plan_rng, num_val, ids)
    train_images, train_anns = _write_split("train", train_plans, out, image_size, seed, cats, 0)
    val_images, val_anns = _write_split("val", val_plans, out, image_size, seed, cats, VAL_ID_OFFSET)
    categories = _category_records(cats, train_anns, num_train)
    info = {
        "description": "regionspot_pl synthetic demo scenes (coloured, textured shapes)",
        "version": str(GENERATOR_VERSION),
        "params": params,
    }
    for split, images, anns in (("train", train_images, train_anns), ("val", val_images, val_anns)):
        dataset = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": categories}
        _dump(dataset, paths[f"{split}_json"])
    paths["vocabulary"].write_text("".join(c["name"] + "\n" for c in categories))
    _dump(params, paths["params"])
    return paths


def _check_sizes(num_train: int, num_val: int, image_size: int, num_classes: int) -> None:
    """DemoDataError unless the set can hold every class in val and its images are large enough."""
    if num_train < 1 or num_val * _MIN_OBJECTS < num_classes:
        raise DemoDataError(
            f"need --num_train >= 1 and --num_val >= {math.ceil(num_classes / _MIN_OBJECTS)} "
            f"(so every one of the {num_classes} classes is in val); got {num_train}, {num_val}"
        )
    if image_size < 64:
        raise DemoDataError(f"--image_size must be >= 64, got {image_size}")


def _is_complete(paths: dict[str, Path], params: dict[str, Any]) -> bool:
    """True when a finished set with exactly these parameters is already on disk."""
    try:
        if json.loads(paths["params"].read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    files = ("train_json", "val_json", "vocabulary")
    counts = (
        (paths["train_images"], params["num_train"]),
        (paths["val_images"], params["num_val"]),
    )
    return all(paths[k].is_file() for k in files) and all(
        d.is_dir() and sum(1 for _ in d.glob("*.jpg")) == n for d, n in counts
    )


# ----------------------------------------------------------------------------- preview


def render_preview(out_dir: str | Path, n: int = 8, split: str = "train", cols: int = 4) -> Path:
    """Draw the first ``n`` images of ``split`` with GT boxes and names into ``out_dir/preview.png``."""
    out = Path(out_dir)
    data = json.loads((out / "annotations" / f"{split}.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    freq = {c["id"]: c["frequency"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = data["images"][:n]
    scale = 2  # upsample so that the labels stay readable next to 256-pixel scenes
    tile = max(im["width"] for im in images) * scale
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (255, 255, 255))
    try:
        font: Any = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has a single fixed-size bitmap font
        font = ImageFont.load_default()
    palette = [(255, 0, 80), (0, 220, 255), (255, 230, 0), (0, 255, 120), (255, 120, 0),
               (200, 100, 255), (255, 255, 255), (120, 255, 0)]  # fmt: skip
    for k, im in enumerate(images):
        pic = Image.open(out / "images" / split / im["file_name"]).convert("RGB")
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(pic)
        for j, a in enumerate(by_image.get(im["id"], [])):
            x, y, w, h = (v * scale for v in a["bbox"])
            col = palette[j % len(palette)]
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=col, width=2)
            label = f"{names[a['category_id']]} [{freq[a['category_id']]}]"
            tb = draw.textbbox((x + 2, y + 2), label, font=font)
            draw.rectangle(tb, fill=(0, 0, 0))
            draw.text((x + 2, y + 2), label, fill=col, font=font)
        sheet.paste(pic, ((k % cols) * tile, (k // cols) * tile))
    path = out / "preview.png"
    sheet.save(path)
    return path


COMMAND = Command(DemoConfig, "python -m regionspot_pl.demo.scenes", __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run)


def run(config: DemoConfig) -> int:
    """Write the scene set (and the preview); print its paths as JSON."""
    paths = generate_demo_dataset(**{k: v for k, v in vars(config).items() if k != "preview"})  # same names
    if config.preview:
        paths["preview"] = render_preview(config.out_dir)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
