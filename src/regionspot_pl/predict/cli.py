"""Name any region of one image with a trained RegionSpot head, and draw the result.

    python -m regionspot_pl.predict --image IMG --vocab "cat,dog" \
        [--boxes "x1,y1,x2,y2;..."] [--points "x,y[,label] ...;..."] [--multimask] \
        --head HEAD --sam-type vit_b --sam-checkpoint sam_vit_b_01ec64.pth \
        --clip-model DIR --out OUT.png [--topk 3] [--device cpu]
    python -m regionspot_pl.predict --everything (--image IMG --out OUT.png | --images DIR [--out PICS])
        --json OUT.json --vocab ... --head ... [--points-per-side 32 --pred-iou-thresh 0.88 ...]

Regions are SAM prompts, given in pixels of the original image:

* ``--boxes "x1,y1,x2,y2;x1,y1,x2,y2"``: one region per ``;``-separated box.
* ``--points "x,y[,label] x,y[,label];..."``: one region per ``;``-separated group; the points of
  a group (separated by spaces) prompt SAM together. ``label`` is 1 (foreground, the default)
  or 0 (background), as SAM's ``point_labels``. ``--points "120,80;300,200"`` is two regions of
  one point each; ``--points "120,80 150,95,0"`` one region with a foreground and a background
  point.
* both: region i is box i together with points group i (SAM takes a box and points in one
  prompt); the two must have as many ``;``-separated entries.

``--multimask`` names SAM's three candidate masks of each region (printed with SAM's predicted
IoU each; the picture shows the best). ``--vocab`` is a file (one class name a line) if that path
exists, else comma-separated names. ``--head`` is a head file (``.pt``) or a model folder
(config.json + model.safetensors, or a Hugging Face Hub id). Writes a picture (regions, top label
+ probability, SAM mask) and prints JSON, one entry per region.

``--everything`` names every region SAM's own automatic mask generator finds (no prompts; its
parameters are the flags below) against the vocabulary, drops those whose top probability is
below ``--score-thresh``, and writes one JSON for all images (COCO layout: ``images``,
``categories`` numbered 1.. in vocabulary order, and ``annotations`` with bbox, the generator's
mask as RLE, category_id/name and score, which is also a COCO results list) plus pictures.

Settings can also come from ``--config FILE.yaml`` (keys: the flags' names with underscores, the
generator's under ``generator:``); ``--print-config`` prints them. The library is
:mod:`regionspot_pl.predictor` (the :class:`~regionspot_pl.predictor.Predictor`) and
:mod:`regionspot_pl.everything`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..backbones.common import DEFAULT_TEXT_CACHE, PRECISIONS, resolve_device
from ..backbones.sam import OFFICIAL_SAM_CHECKPOINTS, SAM_TYPES
from ..cli import Command, ConfigError, option, run_command
from ..utils.io import OutputError, write_json_atomic
from .everything import GeneratorSettings, label_images, list_images, picture_paths
from .predictor import (
    Predictor,
    PromptError,
    best_candidate,
    load_image,
    read_vocabulary,
    region_box,
    region_prompts,
)


@dataclass
class PredictConfig:
    """The settings of ``python -m regionspot_pl.predict``."""

    image: str | None = option(None, "image file")
    images: str | None = option(None, "with --everything: a folder of images (.jpg, .png, ...; not its subfolders)")
    boxes: str | None = option(None, 'regions as boxes in pixels: "x1,y1,x2,y2;x1,y1,x2,y2" (";" between regions)')
    points: str | None = option(
        None,
        'regions as points in pixels: "x,y[,label] x,y[,label];x,y" (";" between regions, spaces between the '
        "points of one region; label 1 foreground (default), 0 background). With --boxes: region i is box i "
        "plus points group i (as many groups as boxes)",
    )
    multimask: bool = option(False, "name SAM's three masks per region")
    vocab: str | None = option(None, "class-name file (one a line) or 'cat,dog,...' (required)")
    head: str | None = option(
        None, "head file (.pt: fit's head.pt, convert's output) or model folder / Hugging Face Hub id (required)"
    )
    sam_type: str | None = option(None, "SAM backbone (required)", choices=SAM_TYPES)
    sam_checkpoint: str | None = option(None, "SAM checkpoint (required), e.g. " + OFFICIAL_SAM_CHECKPOINTS["vit_b"])
    clip_model: str | None = option(None, "local Hugging Face CLIP folder (required)")
    out: str | None = option(
        None, "picture to write (PNG); with --everything --images a folder for one picture per image (optional there)"
    )
    attention_out: str | None = option(None, "also write the regions' attention maps (PNG grid)")
    topk: int = option(3, "labels per region", minimum=1)
    device: str = option("cpu", "cpu, cuda or cuda:N")
    precision: str = option("auto", "autocast as in extraction (auto: fp32 on CPU)", choices=PRECISIONS)
    text_cache: str = option(DEFAULT_TEXT_CACHE, "HDF5 text-embedding cache")
    everything: bool = option(False, "name every region SAM's automatic mask generator finds")
    json: str | None = option(None, "with --everything: COCO-layout JSON to write (images, categories, annotations)")
    score_thresh: float = option(
        0.0,
        "with --everything: drop regions whose top probability is below this (0: keep all; the top "
        "probability is at least 1 / vocabulary size)",
        minimum=0,
    )
    progress: bool = option(True, "with --everything --images: a progress bar on stderr")
    # SAM's automatic mask generator (--everything), with SAM's defaults; on small SAMs lower
    # --pred-iou-thresh and --stability-score-thresh
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)

    def check(self) -> None:
        """Required settings, ranges and flags that do not go together, before anything is loaded."""
        for name in ("vocab", "head", "sam_type", "sam_checkpoint", "clip_model"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} is required (see --help)")
        if self.score_thresh > 1.0:
            raise ConfigError(f"--score-thresh must be in [0, 1], got {self.score_thresh}")
        self.generator.check()
        resolve_device(self.device)
        if self.everything:
            self._check_everything()
            return
        if self.images:
            raise ConfigError("--images DIR works with --everything; name your own regions with --image")
        if not self.image:
            raise ConfigError("give --image IMG (and --boxes and/or --points), or --everything")
        if not (self.boxes or self.points):
            raise ConfigError("give the regions: --boxes and/or --points (or --everything)")
        if not self.out:
            raise ConfigError("give --out PICTURE.png")

    def _check_everything(self) -> None:
        given = [f"--{f.replace('_', '-')}" for f in ("boxes", "points", "attention_out") if getattr(self, f)]
        if given or self.multimask:
            flag = given[0] if given else "--multimask"
            raise ConfigError(f"{flag} does not go with --everything, which finds the regions itself")
        if bool(self.image) == bool(self.images):
            raise ConfigError("--everything takes one of --image IMG or --images DIR")
        if not self.json:
            raise ConfigError("--everything needs --json OUT.json for the named regions")
        if self.image and not self.out:
            raise ConfigError("--everything --image needs --out PICTURE.png")


COMMAND = Command(PredictConfig, "python -m regionspot_pl.predict", __doc__)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run, stop_hint="outputs written so far may be incomplete")


def run(config: PredictConfig) -> int:
    """Name the regions the settings ask for; 0 on success."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own errors
    if config.everything:
        _run_everything(config)
    else:
        _run_prompts(config)
    return 0


# ------------------------------------------------------------------------------- flag parsing
def parse_boxes(text: str) -> list[list[float]]:
    """'x1,y1,x2,y2;x1,y1,x2,y2' -> [[x1, y1, x2, y2], ...]."""
    boxes = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        values = part.split(",")
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4:
            raise PromptError(
                f"--boxes entry {i} {part.strip()!r} is not four numbers x1,y1,x2,y2; "
                'separate boxes with ";", e.g. --boxes "10,10,80,90;100,20,180,120"'
            )
        boxes.append(box)
    if not boxes:
        raise PromptError('--boxes is empty; give at least one box "x1,y1,x2,y2"')
    return boxes


def _parse_point(token: str, where: str, example: str) -> tuple[list[float], int]:
    """'x,y' or 'x,y,label' -> ([x, y], label)."""
    try:
        values = [float(v) for v in token.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise PromptError(
            f"--points {where} {token!r} is not x,y or x,y,label; separate "
            f'the points of a region with spaces and regions with ";", {example}'
        )
    label = values[2] if len(values) == 3 else 1.0
    if label not in (0.0, 1.0):
        raise PromptError(f"--points {where} {token!r}: label must be 1 (foreground) or 0 (background), got {label:g}")
    return values[:2], int(label)


def parse_points(text: str) -> tuple[list[list[list[float]]], list[list[int]]]:
    """'x,y[,label] x,y[,label];x,y' -> (point_coords, point_labels), one entry per region.

    ``;`` separates regions, whitespace the points of one region; a label is 1 (foreground,
    the default) or 0 (background).
    """
    example = 'e.g. --points "120,80;300,200 310,260,0" (two regions, the second with a background point)'
    coords, labels = [], []
    for r, group in enumerate(g for g in text.split(";") if g.strip()):
        tokens = re.sub(r"\s*,\s*", ",", group.strip()).split()
        parsed = [_parse_point(token, f"region {r} point {i}", example) for i, token in enumerate(tokens)]
        coords.append([xy for xy, _ in parsed])
        labels.append([label for _, label in parsed])
    if not coords:
        raise PromptError(f"--points is empty; {example}")
    return coords, labels


def parse_vocab(text: str) -> list[str] | Path:
    """--vocab: an existing file path, else comma-separated class names."""
    if Path(text).is_file():
        return Path(text)
    return [name.strip() for name in text.split(",") if name.strip()]


# ------------------------------------------------------------------------------------ running
def _predictor(config: PredictConfig) -> Predictor:
    return Predictor.from_pretrained(
        config.head, config.sam_type, config.sam_checkpoint, config.clip_model,
        device=config.device, text_cache=config.text_cache, precision=config.precision,
    )  # fmt: skip


def _writing(path: str | Path) -> Path:
    """``path`` with its parent folder made; OutputError when that cannot be done."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err}") from None
    return path


def _save(picture, path: str | Path) -> None:
    try:
        picture.save(_writing(path))
    except OSError as err:
        raise OutputError(f"cannot write the picture {path}: {err}") from None


def _run_prompts(config: PredictConfig) -> None:
    """--boxes / --points: name the regions, draw them, print one JSON line per region."""
    boxes = parse_boxes(config.boxes) if config.boxes else None
    coords, labels = parse_points(config.points) if config.points else (None, None)
    vocab = parse_vocab(config.vocab)
    image = load_image(config.image)  # fail on bad input before loading any model
    region_prompts(boxes, coords, labels, image.shape[:2])
    read_vocabulary(vocab)
    predictor = _predictor(config)
    predictor.set_image(image)
    results = predictor.predict(
        boxes, vocab, topk=config.topk, return_attention=bool(config.attention_out),
        point_coords=coords, point_labels=labels, multimask_output=config.multimask,
    )  # fmt: skip
    _draw_prompts(config, predictor, image, [best_candidate(r) for r in results])
    keys = ("box", "point_coords", "point_labels", "labels", "scores", "iou")
    # one region a line: parseable as a whole, readable by eye
    rows = [json.dumps({k: r[k] for k in keys if r[k] is not None}) for r in results]
    print("[\n" + ",\n".join(rows) + "\n]")


def _draw_prompts(config: PredictConfig, predictor: Predictor, image, shown: list[dict]) -> None:
    """The picture at --out and, with --attention-out, the attention maps."""
    from . import viz  # matplotlib is needed only here

    picture = viz.draw_detections(
        image, [r["box"] for r in shown], [r["labels"][0] for r in shown],
        [r["scores"][0] for r in shown], masks=[r["mask"] for r in shown],
        points=[(r["point_coords"], r["point_labels"]) if r["point_coords"] else None for r in shown],
    )  # fmt: skip
    _save(picture, config.out)
    if config.attention_out:
        maps = [
            viz.draw_attention(image, region_box(r), r["attention"], predictor.clip_grid,
                               title=f"region {i}: {r['labels'][0]}")
            for i, r in enumerate(shown)
        ]  # fmt: skip
        _writing(config.attention_out)
        try:
            viz.save_grid(maps, config.attention_out, cols=min(4, len(maps)))
        except OSError as err:
            raise OutputError(f"cannot write the attention maps {config.attention_out}: {err}") from None


def _run_everything(config: PredictConfig) -> None:
    """--everything with --image (picture at --out) or --images (pictures in --out, if given)."""
    vocab = read_vocabulary(parse_vocab(config.vocab))
    if config.image:
        files = [Path(config.image)]
        load_image(files[0])  # a bad image fails before any model is loaded
        pictures = {files[0]: Path(config.out)}
    else:
        files = list_images(config.images)
        pictures = picture_paths(files, Path(config.out)) if config.out else None
    json_path = _writing(config.json)  # before the work: a bad --json fails now
    predictor = _predictor(config)
    progress = bool(config.images) and config.progress
    try:
        data = label_images(predictor, files, vocab, config.generator, config.score_thresh, pictures, progress)
    except OSError as err:  # a picture that cannot be written
        raise OutputError(f"cannot write a picture: {err}") from None
    data["info"]["head"] = str(config.head)
    try:
        write_json_atomic(json_path, data, indent=None)
    except OSError as err:
        raise OutputError(f"cannot write {json_path}: {err}") from None
    print(f"named {len(data['annotations'])} regions in {len(data['images'])} images -> {json_path}")


if __name__ == "__main__":
    sys.exit(main())
