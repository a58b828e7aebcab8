"""What ``python -m regionspot_pl.predict`` runs (:mod:`regionspot_pl.predict.cli` is its command
line): the regions of the flags parsed, named, drawn and written."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..utils.io import OutputError, write_json_atomic
from .everything import label_images, list_images, picture_paths
from .predictor import Predictor
from .prompts import PromptError, load_image, read_vocabulary, region_prompts
from .results import best_candidate, region_box
from .settings import PredictConfig


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
    """boxes / points: name the regions, draw them, print one JSON line per region."""
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
    """The picture at --out and, with --attention_out, the attention maps."""
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
    """everything with --image (picture at --out) or --images (pictures in --out, if given)."""
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
