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

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..cli import Command, ConfigError, option, run_command
from ..errors import RegionSpotError
from ..utils.io import write_json_atomic

# Bump when the drawing or sampling changes, so that stale generated sets are redrawn.
GENERATOR_VERSION = 1
VAL_ID_OFFSET = 1_000_000
_MIN_VISIBLE = 0.55  # fraction of an object's own area that must stay visible under occluders
_MIN_OBJECTS, _MAX_DISTINCT, _MAX_OBJECTS = 3, 6, 8  # per image: classes (min/max), instances (max)
_JPEG_QUALITY = 92
# Object radius range as a fraction of the image side: the smallest objects still span about 1/5
# of the side, several 16-pixel CLIP patches once the image is resized to 224.
_RADIUS_RANGE = (0.1, 0.21)


class DemoDataError(RegionSpotError, ValueError):
    """Demo set sizes that cannot hold every class, or images too small to draw on."""


SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "diamond", "hexagon", "crescent", "arrow",
)  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 185),
    "orange": (245, 130, 25),
    "cyan": (35, 195, 205),
    "white": (240, 240, 240),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted")
# A fixed, seed-independent shuffle decides which classes are frequent, common and rare, so the
# class list and its long tail stay the same whatever ``seed`` draws the scenes.
_RANK_SEED = 20231103


@dataclass(frozen=True)
class Category:
    """One demo class: a shape drawn in a colour with a texture."""

    id: int
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def demo_categories() -> list[Category]:
    """The 40 demo classes (ids 1..40): every (shape, texture) pair once, colours spread evenly.

    ``colour = (shape + 3 * texture) mod 8`` gives each colour 5 classes and each shape 4 different
    colours, so colour, shape and texture are each shared between classes.
    """
    names = list(COLOURS)
    cats = []
    for t, texture in enumerate(TEXTURES):
        for s, shape in enumerate(SHAPES):
            colour = names[(s + 3 * t) % len(names)]
            cats.append(Category(len(cats) + 1, shape, colour, texture))
    return cats


def frequency_thresholds(num_train: int) -> tuple[int, int]:
    """(rare_max, common_max) train-image counts: LVIS's 10/100 at 600 train images, scaled."""
    rare_max = max(1, round(10 * num_train / 600))
    common_max = max(rare_max + 1, round(100 * num_train / 600))
    return rare_max, common_max


def frequency_of(image_count: int, num_train: int) -> str:
    """LVIS frequency letter ('r', 'c', 'f') for a class seen in ``image_count`` train images."""
    rare_max, common_max = frequency_thresholds(num_train)
    if image_count <= rare_max:
        return "r"
    return "c" if image_count <= common_max else "f"


# ----------------------------------------------------------------------------- shapes


def _circle(r: float = 1.0, n: int = 48, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star() -> np.ndarray:
    pts = _regular(10)
    pts[1::2] *= 0.45
    return pts


_W = 0.34  # half-width of the cross's arms
_CROSS = np.array([(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1),
                   (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)], float)  # fmt: skip
_ARROW = np.array([(-1, -0.26), (0.15, -0.26), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.26),
                   (-1, 0.26)], float)  # fmt: skip

# Each shape is a list of (polygon in a unit frame, fill): fill 0 cuts a hole (ring, crescent).
_SHAPE_POLYS: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_circle(), 1)],
    "square": [(np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), 1)],
    "triangle": [(_regular(3) + np.array([0.0, 0.2]), 1)],
    "star": [(_star(), 1)],
    "cross": [(_CROSS, 1)],
    "ring": [(_circle(), 1), (_circle(0.55), 0)],
    "diamond": [(np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], float), 1)],
    "hexagon": [(_regular(6, phase=0.0), 1)],
    "crescent": [(_circle(), 1), (_circle(0.82, cx=0.45, cy=-0.15), 0)],
    "arrow": [(_ARROW, 1)],
}


def _shape_polys(shape: str, radius: float, aspect: float, angle: float) -> list[tuple[np.ndarray, int]]:
    """The shape's polygons scaled, stretched and rotated about the origin (pixel units)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scale = np.array([radius * aspect, radius / aspect])
    return [((poly * scale) @ rot.T, fill) for poly, fill in _SHAPE_POLYS[shape]]


# ----------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise in [-1, 1] (a small random grid upsampled bicubically)."""
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(big, np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient + low-frequency noise + faint lines, scribbles and blobs (not objects)."""
    grey = rng.uniform(70, 185)
    ends = grey + rng.uniform(-55, 55, (2, 3))  # two muted colours near one grey level
    phi = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(phi) + (yy - 0.5) * math.sin(phi), 0, 1)
    img = ends[0] + t[..., None] * (ends[1] - ends[0])
    img += rng.uniform(8, 28) * _smooth_noise(rng, size, int(rng.integers(3, 9)))

    # Clutter is drawn on a separate layer and blended faintly, so it never looks like an object.
    layer = Image.new("RGB", (size, size))
    alpha = Image.new("L", (size, size))
    dl, da = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    base = img.mean((0, 1))
    for _ in range(int(rng.integers(2, 6))):  # soft blobs
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.2, 2) * size
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-70, 70, 3), 0, 255))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        dl.ellipse(box, fill=col)
        da.ellipse(box, fill=int(rng.integers(50, 110)))
    alpha = alpha.filter(ImageFilter.GaussianBlur(size / 40))
    for _ in range(int(rng.integers(3, 10))):  # straight lines and random-walk scribbles
        n = 2 if rng.random() < 0.6 else int(rng.integers(4, 9))
        pts = [tuple(p) for p in rng.uniform(-0.1, 1.1, (n, 2)) * size]
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-90, 90, 3), 0, 255))
        width = int(rng.integers(1, 4))
        dl.line(pts, fill=col, width=width)
        da.line(pts, fill=int(rng.integers(60, 150)), width=width)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    return img * (1 - a) + np.asarray(layer, np.float32) * a


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean pattern (True = secondary colour) in the object's own (u, v) frame."""
    if texture == "striped":
        return (u / period) % 1.0 < 0.5
    if texture == "checkered":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    if texture == "dotted":
        du = u - period * np.round(u / period)
        dv = v - period * np.round(v / period)
        return du * du + dv * dv < (0.32 * period) ** 2
    return np.zeros(u.shape, bool)


@dataclass
class _Placed:
    category_id: int
    full_area: int


def _render_image(
    rng: np.random.Generator, size: int, plan: list[int], cats: dict[int, Category]
) -> tuple[np.ndarray, np.ndarray, list[_Placed]]:
    """Draw one scene. Returns (uint8 HxWx3 image, int label map 0=background, placed objects)."""
    img = _background(rng, size)
    labels = np.zeros((size, size), np.int32)
    placed: list[_Placed] = []
    visible: list[int] = []
    centres: list[tuple[float, float, float]] = []
    for cid in plan:
        cat = cats[cid]
        min_radius = _RADIUS_RANGE[0] * size
        radius = size * math.exp(rng.uniform(*np.log(_RADIUS_RANGE)))
        aspect = math.exp(rng.uniform(-0.15, 0.15))
        angle = rng.uniform(0, 2 * np.pi)
        for _attempt in range(40):
            polys = _shape_polys(cat.shape, radius, aspect, angle)
            lo, hi = polys[0][0].min(0), polys[0][0].max(0)
            room_lo, room_hi = 1 - lo, size - 2 - hi
            if np.any(room_hi <= room_lo):
                radius *= 0.9
                continue
            if centres and rng.random() < 0.4:  # lean on an existing object to make occlusions
                ox, oy, orad = centres[int(rng.integers(len(centres)))]
                d = (orad + radius) * rng.uniform(0.55, 0.95)
                phi = rng.uniform(0, 2 * np.pi)
                centre = np.clip([ox + d * math.cos(phi), oy + d * math.sin(phi)], room_lo, room_hi)
            else:
                centre = rng.uniform(room_lo, room_hi)
            mimg = Image.new("L", (size, size))
            draw = ImageDraw.Draw(mimg)
            for poly, fill in polys:
                draw.polygon([tuple(p) for p in poly + centre], fill=fill)
            mask = np.asarray(mimg, bool)
            area = int(mask.sum())
            covered = np.bincount(labels[mask], minlength=len(placed) + 1)[1:]
            ok = all(vis - cov >= _MIN_VISIBLE * p.full_area for vis, cov, p in zip(visible, covered, placed))
            if ok and area > 0:
                break
            radius = max(min_radius, radius * 0.93)  # smaller ones fit between the others
        else:
            continue  # no room left: drop this object (counts are taken from what was drawn)
        visible = [vis - int(cov) for vis, cov in zip(visible, covered)]
        placed.append(_Placed(cid, area))
        visible.append(area)
        centres.append((float(centre[0]), float(centre[1]), radius))
        labels[mask] = len(placed)
        _paint(rng, img, mask, cat, centre, radius, angle)
    img += rng.normal(0, 4.0, img.shape).astype(np.float32)  # sensor-like noise over everything
    return np.clip(img, 0, 255).astype(np.uint8), labels, placed


def _paint(
    rng: np.random.Generator,
    img: np.ndarray,
    mask: np.ndarray,
    cat: Category,
    centre: np.ndarray,
    radius: float,
    angle: float,
) -> None:
    """Fill ``mask`` with the category's colour and texture (jittered, mildly shaded), in place."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xx -= centre[0]
    yy -= centre[1]
    tex_angle = angle + rng.uniform(-0.4, 0.4)
    c, s = math.cos(tex_angle), math.sin(tex_angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    period = max(6.0, radius * rng.uniform(0.28, 0.4))
    pattern = _texture(cat.texture, u + rng.uniform(0, period), v, period)

    primary = np.clip(np.array(COLOURS[cat.colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
    # The second tone is a dark version of the same hue, so the colour name stays true.
    secondary = primary * rng.uniform(0.22, 0.38)
    colour = np.where(pattern[..., None], secondary, primary)
    # A gentle light gradient across the object, so objects are not perfectly flat.
    shade = 1.0 + 0.12 * (u * math.cos(angle) + v * math.sin(angle)) / max(radius, 1.0)
    window = mask[y0:y1, x0:x1]
    img[y0:y1, x0:x1][window] = (colour * shade[..., None])[window]


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


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


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
        pixels, labels, placed = _render_image(rng, size, plan, cats)
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
                    "segmentation": _rle(mask),
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


def generate_demo_dataset(
    out_dir: str | Path,
    num_train: int = 600,
    num_val: int = 120,
    image_size: int = 256,
    seed: int = 0,
    force: bool = False,
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
            f"need --num-train >= 1 and --num-val >= {math.ceil(num_classes / _MIN_OBJECTS)} "
            f"(so every one of the {num_classes} classes is in val); got {num_train}, {num_val}"
        )
    if image_size < 64:
        raise DemoDataError(f"--image-size must be >= 64, got {image_size}")


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


@dataclass
class DemoConfig:
    """The settings of ``python -m regionspot_pl.demo.scenes``."""

    out_dir: str | None = option(None, "folder to write the scene set into; also the positional OUT_DIR")
    num_train: int = option(600, "training images", minimum=1)
    num_val: int = option(120, "validation images (enough that every class is in val)", minimum=1)
    image_size: int = option(256, "side of the square images, in pixels", minimum=64)
    seed: int = option(0, "seed of the scenes")
    force: bool = option(False, "redraw even if already generated")
    preview: bool = option(False, "also write OUT_DIR/preview.png")

    def check(self) -> None:
        if self.out_dir is None:
            raise ConfigError("give the folder to write: OUT_DIR (or --out-dir)")


COMMAND = Command(DemoConfig, "python -m regionspot_pl.demo.scenes", __doc__.splitlines()[0], positionals=("out_dir",))


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m regionspot_pl.demo.scenes OUT_DIR [--num-train N ...] [--preview]``."""
    return run_command(COMMAND, argv, run)


def run(config: DemoConfig) -> int:
    """Write the scene set (and the preview); print its paths as JSON."""
    paths = generate_demo_dataset(
        config.out_dir, config.num_train, config.num_val, config.image_size, config.seed, force=config.force
    )
    if config.preview:
        paths["preview"] = render_preview(config.out_dir)
    json.dump({k: str(v) for k, v in paths.items()}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
