"""Name everything: SAM's automatic mask generator finds the regions, RegionSpot names them.

    python -m regionspot_pl.predict --everything --image IMG --out PICTURE.png --json OUT.json ...
    python -m regionspot_pl.predict --everything --images DIR [--out PICTURES] --json OUT.json ...

For each image, the segmenter's own automatic mask generator (segment-anything's
``SamAutomaticMaskGenerator`` for SAM, sam2's ``SAM2AutomaticMaskGenerator`` for SAM 2.1; their
shared parameters exposed as :class:`GeneratorSettings`) runs on the image as read; each mask's
box (the pixels it covers) becomes a region prompt on the predictor's normal box path, all boxes
of an image in one call; each region is named against the vocabulary and kept when its top probability reaches
``score_thresh``. The generator encodes the image with SAM itself, so SAM's image encoder runs
twice per image (the generator's grid of point prompts usually costs more than either).

The output is one JSON in COCO's dataset layout: ``images`` (id, file_name, width, height),
``categories`` (ids 1..C in vocabulary order) and ``annotations`` (bbox XYWH, the generator's
mask as RLE, area, category_id, category_name, score, and SAM's predicted_iou and
stability_score). ``pycocotools.coco.COCO`` loads it as a labelled data set; its
``annotations`` list is also a COCO results list (``COCO.loadRes``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..backbones.image import ImageReadError
from ..errors import RegionSpotError
from ..utils.io import masks_to_rle
from .predictor import Predictor
from .prompts import ImageLike, VocabularyLike, load_image, read_vocabulary
from .settings import GeneratorSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderError(RegionSpotError, FileNotFoundError):
    """An image folder is missing or holds no images."""


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
    generator: Any,
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
    rles = masks_to_rle(np.stack([r["mask"] for r in regions])) if regions else []
    annotations = []
    for i, (region, rle) in enumerate(zip(regions, rles)):
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
        raise ImageFolderError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageFolderError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
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
    generator = settings.build(predictor.encoder.segmenter)  # the segmenter's own generator
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
        except ImageReadError as err:
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


def picture_paths(files: list[Path], folder: Path) -> dict[Path, Path]:
    """One PNG per image, named after it (a.jpg -> a.png; a.jpg.png when two share a stem)."""
    stems = [f.stem for f in files]
    unique = len(set(stems)) == len(stems)
    return {f: folder / (f"{f.stem}.png" if unique else f"{f.name}.png") for f in files}
