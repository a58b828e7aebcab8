"""The web page on Gradio: upload an image, draw boxes (two clicks: opposite corners) or click
points, type class names or pick a loaded vocabulary; see each region's mask, name and probability
and its top-k list.

It answers through the server's own path: the page's fields become the JSON body ``POST /predict``
takes (the image file's bytes in base64), read by ``read_request`` and answered by
``NamingEngine.answer_all``, with the server's limits.
"""

# No postponed annotations: Gradio reads the click handler's ``gr.SelectData`` annotation to pass the event.
import base64
import os
import re
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from pydantic import ValidationError

from ..errors import RegionSpotError
from .engine import NamingEngine, check_before_start
from .requests import NamingRequestBody, RequestError, read_request
from .settings import Limits, ServeConfig

TYPED_VOCABULARY = "(the names typed here)"
POINT, CORNER = "a point", "a box corner"
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


def parse_boxes(text: str) -> list[list[float]]:
    """``"x1, y1, x2, y2"`` a line -> [[x1, y1, x2, y2], ...] (a line of other than 4 numbers is
    kept as it is, for the request's check to name)."""
    return [[float(v) for v in re.findall(_NUMBER, line)] for line in (text or "").splitlines() if line.strip()]


def parse_points(text: str) -> list[list[list[float]]]:
    """A region a line, its points separated by ``;``: ``"x, y"`` (foreground) or ``"x, y, label"``
    -> per region [[x, y, label], ...]."""
    regions = []
    for line in (text or "").splitlines():
        points = [[float(v) for v in re.findall(_NUMBER, point)] for point in line.split(";") if point.strip()]
        if points:
            regions.append([p + [1.0] if len(p) == 2 else p for p in points])
    return regions


def parse_words(text: str) -> list[str]:
    """Class names separated by commas or new lines."""
    return [w.strip() for w in re.split(r"[,\n]", text or "") if w.strip()]


def request_body(image_file: str, boxes: str, points: str, words: str, vocabulary_id: str, top_k: float) -> dict:
    """The page's fields -> the JSON body of ``POST /predict``."""
    body: dict[str, Any] = {
        "image": base64.b64encode(Path(image_file).read_bytes()).decode(),
        "top_k": int(top_k),
        "masks": True,
    }
    if parse_boxes(boxes):
        body["boxes"] = parse_boxes(boxes)
    if parse_points(points):
        body["points"] = parse_points(points)
    if vocabulary_id and vocabulary_id != TYPED_VOCABULARY:
        body["vocabulary_id"] = vocabulary_id
    else:
        body["vocabulary"] = parse_words(words)
    return body


def name_regions(
    engine: NamingEngine, limits: Limits, image_file: str | None, boxes: str, points: str, words: str,
    vocabulary_id: str, top_k: float,
) -> tuple[Any, list[list[Any]], str]:  # fmt: skip
    """The page's one call: (the image with the named masks, the top-k rows, a status line)."""
    if not image_file:
        return None, [], "upload an image first"
    try:
        body = NamingRequestBody(**request_body(image_file, boxes, points, words, vocabulary_id, top_k))
        request = read_request(body, engine.vocabularies, limits)
        answer = engine.answer_all([request])[0]
    except ValidationError as err:
        return None, [], "not named: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    except RegionSpotError as err:
        return None, [], f"not named: {err}"
    if isinstance(answer, RequestError):
        return None, [], f"not named: {answer}"
    regions = answer["regions"]
    shown = []  # each region's box under its name, and its mask
    for i, r in enumerate(regions):
        box = tuple(round(v) for v in r["box"])
        shown += [
            (box, f"{i}: {r['labels'][0]} {r['scores'][0]:.2f}"),
            (mask_utils.decode(r["mask"]).astype(bool), f"{i}: mask"),
        ]
    rows = [
        [i, label, round(score, 4), round(r["iou"], 3)]
        for i, r in enumerate(regions)
        for label, score in zip(r["labels"], r["scores"])
    ]
    status = "; ".join(f"region {i}: {r['labels'][0]} ({r['scores'][0]:.2f})" for i, r in enumerate(regions))
    return (request.pixels, shown), rows, status


def add_click(mode: str, boxes: str, points: str, corner: list | None, x: float, y: float) -> tuple:
    """A click at (x, y) on the image: a point region, or a box corner (the second corner closes
    the box). -> (boxes, points, pending corner, hint)."""
    if mode == POINT:
        return boxes, _append(points, f"{x:g}, {y:g}"), None, f"point region at {x:g}, {y:g}"
    if corner is None:
        return boxes, points, [x, y], f"box corner at {x:g}, {y:g}: click the opposite corner"
    x0, y0 = corner
    box = [min(x0, x), min(y0, y), max(x0, x), max(y0, y)]
    return _append(boxes, ", ".join(f"{v:g}" for v in box)), points, None, f"box {box}"


def _append(text: str, line: str) -> str:
    return f"{(text or '').rstrip()}\n{line}".lstrip()


def build_page(engine: NamingEngine, limits: Limits) -> Any:
    """The Gradio Blocks of the page (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="RegionSpot: name any region") as page:
        corner = gr.State(None)
        with gr.Row():
            image = gr.Image(
                type="filepath", format="png", sources=["upload"], label="image: click to add a prompt", elem_id="image"
            )
            shown = gr.AnnotatedImage(label="named regions", elem_id="shown")
        mode = gr.Radio([CORNER, POINT], value=CORNER, label="a click on the image adds", elem_id="mode")
        with gr.Row():
            boxes = gr.Textbox(label="boxes: x1, y1, x2, y2 a line", lines=3, elem_id="boxes")
            points = gr.Textbox(label="points: x, y[, label] a line (one region each; ; between its points)",
                                lines=3, elem_id="points")  # fmt: skip
        with gr.Row():
            words = gr.Textbox(label="class names, comma separated", elem_id="words")
            choices = [TYPED_VOCABULARY, *sorted(engine.vocabularies)]
            vocabulary = gr.Dropdown(choices, value=TYPED_VOCABULARY, label="vocabulary", elem_id="vocabulary")
            top_k = gr.Slider(1, 20, value=5, step=1, label="top k", elem_id="top_k")
        run = gr.Button("Name regions", variant="primary", elem_id="run")
        status = gr.Textbox(label="result", elem_id="status")
        table = gr.Dataframe(headers=["region", "label", "probability", "SAM IoU"], label="top k", elem_id="table")

        def click(mode: str, boxes: str, points: str, corner: list | None, evt: gr.SelectData) -> tuple:
            return add_click(mode, boxes, points, corner, *evt.index)

        image.select(click, [mode, boxes, points, corner], [boxes, points, corner, status])
        image.upload(lambda: ("", "", None), None, [boxes, points, corner])
        fields = [image, boxes, points, words, vocabulary, top_k]
        run.click(lambda *values: name_regions(engine, limits, *values), fields, [shown, table, status])
    return page


def launch(config: ServeConfig) -> None:
    """Load the models and serve the page on ``config.host``:``config.port`` until stopped."""
    check_before_start(config)
    engine = NamingEngine.from_settings(config)
    build_page(engine, config.limits()).launch(
        server_name=config.host, server_port=config.port, show_error=True, max_file_size=config.max_request_bytes
    )
