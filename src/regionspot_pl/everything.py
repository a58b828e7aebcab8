"""Name everything: SAM's automatic mask generator finds the regions, RegionSpot names them.

    python -m regionspot_pl.predict --everything --image IMG --out PICTURE.png --json OUT.json ...
    python -m regionspot_pl.predict --everything --images DIR [--out PICTURES] --json OUT.json ...

For each image, segment-anything's ``SamAutomaticMaskGenerator`` (its parameters exposed as
:class:`GeneratorSettings`) runs on the image as read; each mask's box (the pixels it covers)
becomes a region prompt on the predictor's normal box path, all boxes of an image in one call;
each region is named against the vocabulary and kept when its top probability reaches
``score_thresh``. The generator encodes the image with SAM itself, so SAM's image encoder runs
twice per image (the generator's grid of point prompts usually costs more than either).

The output is one JSON in COCO's dataset layout: ``images`` (id, file_name, width, height),
``categories`` (ids 1..C in vocabulary order) and ``annotations`` (bbox XYWH, the generator's
mask as RLE, area, category_id, category_name, score, and SAM's predicted_iou and
stability_score). ``pycocotools.coco.COCO`` loads it as a labelled data set; its
``annotations`` list is also a COCO results list (``COCO.loadRes``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from tqdm import tqdm

from .predict import ImageLike, Predictor, VocabularyLike, load_image, read_vocabulary

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_HELP = {
    "points_per_side": "a grid of N x N point prompts over the image",
    "points_per_batch": "point prompts per decoder call (memory)",
    "pred_iou_thresh": "keep masks whose SAM-predicted IoU is at least this",
    "stability_score_thresh": "keep masks whose stability score is at least this",
    "stability_score_offset": "logit offset the stability score binarizes at",
    "box_nms_thresh": "box IoU above which a duplicate mask is dropped (1: keep all)",
    "crop_n_layers": "also run on 2^i x 2^i image crops, i = 1..N",
    "crop_nms_thresh": "box IoU above which a duplicate mask of another crop is dropped",
    "crop_overlap_ratio": "overlap of neighbouring crops, as a fraction of the image side",
    "crop_n_points_downscale_factor": "the grid side shrinks by this per crop layer",
    "min_mask_region_area": "remove islands and fill holes under this many pixels (opencv)",
}


@dataclass(frozen=True)
class GeneratorSettings:
    """``SamAutomaticMaskGenerator``'s parameters, with its defaults (see its docstring)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def check(self) -> None:
        """ValueError naming the first setting out of its range."""
        positive = ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("crop_n_layers", "min_mask_region_area"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unit = ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh")
        for name in (*unit, "crop_overlap_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def build(self, sam: Sam) -> SamAutomaticMaskGenerator:
        """The generator on ``sam``, giving binary masks."""
        self.check()
        return SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **asdict(self))


def mask_box(bbox: list[float]) -> list[float]:
    """SAM's mask box [x, y, w, h] (w = last column - first column) -> the xyxy box of the
    pixels the mask covers, [x, y, x + w + 1, y + h + 1]; its XYWH form is what
    ``pycocotools.mask.toBbox`` gives for the mask."""
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w + 1, y + h + 1]


def name_everything(
    predictor: Predictor,
    image: ImageLike,
    vocabulary: VocabularyLike,
    generator: SamAutomaticMaskGenerator,
    score_thresh: float = 0.0,
) -> list[dict[str, Any]]:
    """Every mask the generator finds in ``image``, named by the predictor.

    Returns:
        one dict per kept region, in the generator's order: ``mask`` HxW bool (the
        generator's), ``box`` [4] xyxy (see :func:`mask_box`), ``area`` (pixels), ``label``,
        ``score`` (its probability), ``predicted_iou``, ``stability_score``, ``point`` [x, y]
        (the grid point that prompted the mask).
    """
    names = read_vocabulary(vocabulary)
    pixels = load_image(image)
    records = [r for r in generator.generate(pixels) if r["area"] > 0]
    predictor.set_image(pixels)
    if not records:
        return []
    boxes = [mask_box(r["bbox"]) for r in records]
    named = predictor.predict(boxes, names, topk=1)
    regions = []
    for record, box, result in zip(records, boxes, named):
        if result["scores"][0] < score_thresh:
            continue
        regions.append({
            "mask": record["segmentation"], "box": box, "area": int(record["area"]),
            "label": result["labels"][0], "score": float(result["scores"][0]),
            "predicted_iou": float(record["predicted_iou"]),
            "stability_score": float(record["stability_score"]),
            "point": [float(v) for v in record["point_coords"][0]],
        })  # fmt: skip
    return regions


def coco_annotations(
    regions: list[dict[str, Any]], image_id: int, names: list[str], first_id: int = 1
) -> list[dict[str, Any]]:
    """Regions of one image -> COCO annotations (ids from ``first_id``; category ids 1..C)."""
    annotations = []
    for i, region in enumerate(regions):
        rle = mask_utils.encode(np.asfortranarray(region["mask"].astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x1, y1, x2, y2 = region["box"]
        annotations.append({
            "id": first_id + i, "image_id": image_id,
            "category_id": names.index(region["label"]) + 1, "category_name": region["label"],
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": region["area"], "segmentation": rle,
            "score": region["score"], "iscrowd": 0, "predicted_iou": region["predicted_iou"],
            "stability_score": region["stability_score"],
        })  # fmt: skip
    return annotations


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (not its subfolders), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def label_images(
    predictor: Predictor,
    files: list[Path],
    vocabulary: VocabularyLike,
    settings: GeneratorSettings,
    score_thresh: float = 0.0,
    pictures: dict[Path, Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Name everything in each of ``files``; returns the COCO-layout dict (module docstring).

    Image ids are 1.. in the order of ``files``; ``file_name`` is the file's name. An image
    that cannot be read is reported on stderr and listed under ``skipped``, and the others go
    on. ``pictures`` maps an image file to the picture to draw of it.
    """
    from . import viz  # matplotlib is needed only here

    names = read_vocabulary(vocabulary)
    generator = settings.build(predictor.sam.sam)
    data: dict[str, Any] = {
        "info": {"description": "regions found by SAM's automatic mask generator, named by "
                 "RegionSpot (python -m regionspot_pl.predict --everything)",
                 "generator": asdict(settings), "score_thresh": score_thresh},
        "images": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        "annotations": [], "skipped": [],
    }  # fmt: skip
    bar = tqdm(files, desc="name everything", unit="image", disable=not progress, file=sys.stderr)
    for image_id, path in enumerate(bar, start=1):
        try:
            pixels = load_image(path)
        except (ValueError, OSError) as err:
            tqdm.write(f"warning: skipped {path}: {err}", file=sys.stderr)
            data["skipped"].append({"file_name": path.name, "error": str(err)})
            continue
        regions = name_everything(predictor, pixels, names, generator, score_thresh)
        height, width = pixels.shape[:2]
        data["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        data["annotations"] += coco_annotations(regions, image_id, names, len(data["annotations"]) + 1)
        if pictures is not None and path in pictures:
            picture = viz.draw_masks(pixels, [r["mask"] for r in regions],
                                     [r["label"] for r in regions], [r["score"] for r in regions])  # fmt: skip
            pictures[path].parent.mkdir(parents=True, exist_ok=True)
            picture.save(pictures[path])
        bar.set_postfix(regions=len(data["annotations"]))
    return data


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` to ``path`` (parent folders created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ CLI
def add_everything_arguments(parser: argparse.ArgumentParser) -> None:
    """--everything, --json, --score-thresh and the generator's parameters."""
    g = parser.add_argument_group(
        "name everything (--everything)",
        "SAM's automatic mask generator finds the regions (its parameters below, with SAM's "
        "defaults; on small SAMs lower --pred-iou-thresh and --stability-score-thresh)",
    )
    g.add_argument("--everything", action="store_true", help="name every region SAM finds")
    g.add_argument("--json", help="COCO-layout JSON to write (images, categories, annotations)")
    g.add_argument(
        "--score-thresh", type=float, default=0.0,
        help="drop regions whose top probability is below this (default 0: keep all; the top "
        "probability is at least 1 / vocabulary size)",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar with --images")
    for f in fields(GeneratorSettings):
        flag = "--" + f.name.replace("_", "-")
        g.add_argument(flag, type=type(f.default), default=f.default,
                       help=f"{_HELP[f.name]} (default {f.default:g})")  # fmt: skip


def run_cli(args: argparse.Namespace) -> None:
    """--everything with --image (picture at --out) or --images (pictures in --out, if given)."""
    from .predict import parse_vocab

    settings = GeneratorSettings(**{f.name: getattr(args, f.name) for f in fields(GeneratorSettings)})
    settings.check()
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ValueError(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    vocab = read_vocabulary(parse_vocab(args.vocab))
    if args.image:
        files = [Path(args.image)]
        load_image(files[0])  # a bad image fails before any model is loaded
        pictures = {files[0]: Path(args.out)}
    else:
        files = list_images(args.images)
        pictures = _picture_paths(files, Path(args.out)) if args.out else None
    predictor = Predictor.from_pretrained(
        args.head, args.sam_type, args.sam_checkpoint, args.clip_model,
        device=args.device, text_cache=args.text_cache,
    )  # fmt: skip
    data = label_images(predictor, files, vocab, settings, args.score_thresh, pictures,
                        progress=bool(args.images) and not args.no_progress)  # fmt: skip
    data["info"]["head"] = str(args.head)
    path = write_json(data, args.json)
    print(f"named {len(data['annotations'])} regions in {len(data['images'])} images -> {path}")


def _picture_paths(files: list[Path], folder: Path) -> dict[Path, Path]:
    """One PNG per image, named after it (a.jpg -> a.png; a.jpg.png when two share a stem)."""
    stems = [f.stem for f in files]
    unique = len(set(stems)) == len(stems)
    return {f: folder / (f"{f.stem}.png" if unique else f"{f.name}.png") for f in files}
