"""The web page: its one call answers as the Predictor does (through the server's path), clicks
make boxes and points, bad input becomes a "not named: ..." line, and in a real browser (headless
Chromium driven by Playwright) an uploaded image with a box drawn by two clicks shows the region's
label. ``REGIONSPOT_SCREENSHOT=docs/page.png`` makes that test write the page's picture there."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from serving import free_port, model_flags, pixels, points_as_prompts, python_module, running

from regionspot_pl.serve.engine import NamingEngine
from regionspot_pl.serve.page import CORNER, POINT, TYPED_VOCABULARY, add_click, name_regions, parse_points
from regionspot_pl.serve.settings import Limits

WORDS = ["red solid circle", "green solid square", "blue solid triangle", "white solid hexagon"]
BOXES = [[103.0, 131.0, 189.0, 214.0], [114.0, 156.0, 170.0, 215.0]]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def image(demo_data) -> Path:
    return sorted(demo_data["val_images"].glob("*.jpg"))[0]


def as_regions(rows: list[list], top_k: int) -> list[dict]:
    """The page's top-k rows back into per-region labels and scores."""
    regions = [{"labels": [], "scores": []} for _ in range(len(rows) // top_k)]
    for region, label, probability, _ in rows:
        regions[region]["labels"].append(label)
        regions[region]["scores"].append(probability)
    return regions


@pytest.mark.parametrize("prompt", ["boxes", "points"])
def test_the_pages_call_answers_as_the_predictor(predictor, image, prompt):
    engine = NamingEngine(predictor)
    boxes = "\n".join(", ".join(f"{v:g}" for v in box) for box in BOXES) if prompt == "boxes" else ""
    points = "150, 170\n140, 180; 20, 20, 0" if prompt == "points" else ""
    shown, rows, status = name_regions(engine, Limits(), str(image), boxes, points, ", ".join(WORDS), "", 3)
    predictor.set_image(image)
    if prompt == "boxes":
        want = predictor.predict(BOXES, WORDS, topk=3)
    else:
        want = predictor.predict(None, WORDS, topk=3, **points_as_prompts(parse_points(points)))
    got = as_regions(rows, 3)
    for region, result in zip(got, want):  # the table rounds probabilities to 4 places
        assert region["labels"] == result["labels"]
        np.testing.assert_allclose(region["scores"], result["scores"], rtol=0, atol=5e-5)
    assert status.startswith(f"region 0: {want[0]['labels'][0]}")
    picture, overlays = shown
    np.testing.assert_array_equal(picture, pixels(image))
    np.testing.assert_array_equal(overlays[3][0], want[1]["mask"])  # region 1: its box, then its mask
    if prompt == "boxes":
        assert overlays[2][0] == tuple(round(v) for v in BOXES[1])


def test_a_loaded_vocabulary_is_used_by_name(predictor, image):
    engine = NamingEngine(predictor, vocabularies={"shapes": WORDS})
    _, rows, _ = name_regions(engine, Limits(), str(image), "10, 10, 60, 60", "", "ignored words", "shapes", 4)
    predictor.set_image(image)
    want = predictor.predict([[10, 10, 60, 60]], WORDS, topk=4)[0]
    assert [row[1] for row in rows] == want["labels"]
    np.testing.assert_allclose([row[2] for row in rows], want["scores"], rtol=0, atol=5e-5)


def test_clicks_make_points_and_boxes():
    assert add_click(POINT, "", "", None, 12, 34) == ("", "12, 34", None, "point region at 12, 34")
    boxes, points, corner, hint = add_click(CORNER, "1, 2, 3, 4", "12, 34", None, 80, 20)
    assert (boxes, points, corner) == ("1, 2, 3, 4", "12, 34", [80, 20]) and "opposite corner" in hint
    boxes, _, corner, _ = add_click(CORNER, boxes, points, corner, 30, 60)
    assert boxes == "1, 2, 3, 4\n30, 20, 80, 60" and corner is None  # corners in any order


@pytest.mark.parametrize(
    "boxes,words,vocabulary,error",
    [("1, 2, 3", "a, b", TYPED_VOCABULARY, "[N, 4]"), ("1, 2, 30, 40", "", TYPED_VOCABULARY, "empty"),
     ("1, 2, 30, 40", "a", "nope", "not loaded"), ("", "a", TYPED_VOCABULARY, "missing prompts"),
     ("1, 2, 3000, 40", "a", TYPED_VOCABULARY, "outside the image")],
)  # fmt: skip
def test_bad_input_becomes_a_not_named_line(predictor, image, boxes, words, vocabulary, error):
    engine = NamingEngine(predictor)
    shown, rows, status = name_regions(engine, Limits(), str(image), boxes, "", words, vocabulary, 5)
    assert shown is None and rows == [] and status.startswith("not named: ") and error in status, status
    assert name_regions(engine, Limits(), None, boxes, "", words, vocabulary, 5)[2] == "upload an image first"


def _draw_a_box_and_name_it(page, url: str, image: Path, words: list[str]) -> tuple[str, str]:
    """Upload, two clicks on the image (opposite corners), type the names, run: (the box drawn,
    the result line)."""
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(str(image))
    shown = page.locator("#image img").first
    shown.wait_for(timeout=120_000)
    size = shown.bounding_box()
    boxes, status = page.locator("#boxes textarea"), page.locator("#status textarea")
    shown.click(position={"x": size["width"] * 0.40, "y": size["height"] * 0.50})  # a corner ...
    page.wait_for_function("el => el.value.includes('opposite corner')", arg=status.element_handle(), timeout=60_000)
    shown.click(position={"x": size["width"] * 0.75, "y": size["height"] * 0.85})  # ... and the opposite one
    page.wait_for_function("el => el.value.trim().length > 0", arg=boxes.element_handle(), timeout=60_000)
    page.locator("#words textarea, #words input").first.fill(", ".join(words))
    page.locator("#run").click()
    page.wait_for_function("el => /^(region|not named)/.test(el.value)", arg=status.element_handle(), timeout=300_000)
    return boxes.input_value(), status.input_value()


def _save_screenshot(page, path: str) -> None:
    """The whole page, at most 900 pixels wide, in 128 colours (a small PNG for the README)."""
    from PIL import Image

    full = Path(path).with_suffix(".full.png")
    page.screenshot(path=str(full), full_page=True)
    with Image.open(full) as shot:
        scale = min(1.0, 900 / shot.width)
        small = shot.convert("RGB").resize((round(shot.width * scale), round(shot.height * scale)), Image.LANCZOS)
    small.quantize(colors=128).save(path, optimize=True)
    full.unlink()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="Playwright is not installed: make browser")
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: make browser says how to get one")
def test_in_a_browser_a_drawn_box_gets_its_label(predictor, tiny_backbones, tiny_head, image, tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    flags = [*model_flags(tiny_head["file"], tiny_backbones, tmp_path / "text.h5"), "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with running(python_module("regionspot_pl.app", *flags), url, tmp_path / "page.log"), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            drawn, result = _draw_a_box_and_name_it(page, url, image, WORDS)
            if os.environ.get("REGIONSPOT_SCREENSHOT"):
                _save_screenshot(page, os.environ["REGIONSPOT_SCREENSHOT"])
        finally:
            browser.close()
    box = [float(v) for v in drawn.split(",")]
    assert len(box) == 4 and box[0] < box[2] and box[1] < box[3], drawn
    predictor.set_image(image)
    want = predictor.predict([box], WORDS, topk=5)[0]
    assert result == f"region 0: {want['labels'][0]} ({want['scores'][0]:.2f})", result
