"""The naming server over HTTP on 127.0.0.1 (``python -m regionspot_pl.serve`` in its own process,
a real client): answers equal the Predictor's, 32 concurrent clients each get their own answer,
every bad input gets a 4xx naming it and the server goes on answering, the README's curl example
names regions, and SIGTERM stops every process of the server."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import b64, check_answer, free_port, model_flags, points_as_prompts, python_module, running, stop

from regionspot_pl.serve.server import MonitorQuietAfterStop, stops_as_keyboard_interrupt

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["red solid circle", "green solid square", "blue solid triangle", "yellow solid star", "white hexagon"]
BOXES = [[103.0, 131.0, 189.0, 214.0], [114.0, 156.0, 170.0, 215.0], [10.0, 20.0, 120.0, 90.0]]
POINTS = [[[150.0, 170.0, 1.0]], [[140.0, 180.0, 1.0], [20.0, 20.0, 0.0]]]
LIMITS = {"max_pixels": 300_000, "max_regions": 16, "max_points": 8, "max_vocabulary": 50, "max_name_length": 40,
          "max_request_bytes": 1_000_000}  # fmt: skip
STOPPED_BY_SIGTERM = 128 + 15


@pytest.fixture(scope="module")
def server(tiny_backbones, tiny_head, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    flags = [*model_flags(tiny_head["file"], tiny_backbones, root / "text.h5"), "--port", str(port),
             "--vocabulary", f"[demo={demo_data['vocabulary']}]", "--max_batch_size", "8", "--image_cache", "4",
             *(f"--{k}={v}" for k, v in LIMITS.items())]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with running(python_module("regionspot_pl.serve", *flags), f"{url}/health", root / "server.log") as proc:
        yield url
        assert stop(proc) == STOPPED_BY_SIGTERM, (root / "server.log").read_text()[-3000:]
    assert "Traceback" not in (root / "server.log").read_text()


@pytest.fixture(scope="module")
def images(demo_data):
    return sorted(demo_data["val_images"].glob("*.jpg"))[:4]


def post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=body, timeout=timeout)


def test_boxes_answer_equals_the_predictor(server, images, predictor):
    body = {"image": b64(images[0]), "boxes": BOXES, "vocabulary": WORDS, "masks": True, "embeddings": True}
    response = post(server, body)
    assert response.status_code == 200, response.text
    predictor.set_image(images[0])
    check_answer(response.json()["regions"], predictor.predict(BOXES, WORDS), predictor.region_embeddings(BOXES))


def test_points_with_a_loaded_vocabulary_answer_equals_the_predictor(server, images, predictor, demo_data):
    body = {"image": b64(images[1]), "points": POINTS, "boxes": BOXES[:2], "vocabulary_id": "demo", "top_k": 2,
            "masks": True}  # fmt: skip
    response = post(server, body)
    assert response.status_code == 200, response.text
    predictor.set_image(images[1])
    names = demo_data["vocabulary"].read_text().split("\n")
    expected = predictor.predict(BOXES[:2], [n for n in names if n], topk=2, **points_as_prompts(POINTS))
    check_answer(response.json()["regions"], expected)
    assert [len(r["labels"]) for r in response.json()["regions"]] == [2, 2]


@pytest.mark.slow
def test_32_concurrent_clients_each_get_their_own_answer(server, images, predictor):
    """Each client its own boxes on one of two images (both seen once first, so that every answer
    comes from the same features the Predictor computes)."""
    for image in images[2:4]:
        assert post(server, {"image": b64(image), "boxes": BOXES[:1], "vocabulary": WORDS}).status_code == 200
    jobs = [(images[2 + i % 2], [[x + i, y, x2 + i, y2] for x, y, x2, y2 in BOXES[: 1 + i % 3]]) for i in range(32)]

    def ask(job):
        image, boxes = job
        return post(server, {"image": b64(image), "boxes": boxes, "vocabulary": WORDS, "masks": True})

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(ask, jobs))
    for (image, boxes), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        predictor.set_image(image)
        check_answer(response.json()["regions"], predictor.predict(boxes, WORDS))


def png(size: tuple[int, int], noise: bool = False) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    (Image.fromarray(pixels) if noise else Image.new("L", size)).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def bad_requests(image: str) -> dict:
    """name -> (a JSON body, or raw (content, content type), the status, words the error holds)."""
    good = {"image": image, "boxes": [[10, 10, 50, 50]], "vocabulary": WORDS}
    noise = png((200, 200), noise=True)

    def without(key):
        return {k: v for k, v in good.items() if k != key}

    return {
        "not base64": ({**good, "image": "not base64 at all!"}, 400, "base64"),
        "a URL": ({**good, "image": "https://example.com/a.jpg"}, 400, "URL"),
        "not an image": ({**good, "image": b64(b"hello, not an image")}, 415, "JPEG, PNG or WebP"),
        "truncated image": ({**good, "image": b64(noise[: len(noise) // 2])}, 400, "truncated"),
        "too elongated": ({**good, "image": b64(png((3000, 1)))}, 400, "too elongated"),
        "too many pixels": ({**good, "image": b64(png((1000, 400)))}, 413, "400000 pixels"),
        "decompression bomb": ({**good, "image": b64(bomb_png(100_000, 100_000))}, 413, "too large"),
        "too many regions": ({**good, "boxes": [[10, 10, 50, 50]] * 17}, 413, "17 regions"),
        "too many points": ({**without("boxes"), "points": [[[20, 20, 1]] * 9]}, 413, "9 points"),
        "inverted box": ({**good, "boxes": [[50, 50, 10, 10]]}, 400, "x2 > x1"),
        "NaN box": (
            ('{"image": "' + image + '", "boxes": [[NaN, 1, 5, 5]], "vocabulary": ["a"]}', "application/json"),
            400,
            "non-finite",
        ),  # fmt: skip
        "box outside": ({**good, "boxes": [[10, 10, 500, 50]]}, 400, "outside the image"),
        "box of 3 numbers": ({**good, "boxes": [[10, 10, 50]]}, 400, "[N, 4]"),
        "box not numbers": ({**good, "boxes": [["a", 10, 50, 50]]}, 422, "boxes.0.0"),
        "no regions": ({**good, "boxes": []}, 400, "no regions"),
        "empty vocabulary": ({**good, "vocabulary": []}, 400, "empty"),
        "repeated name": ({**good, "vocabulary": ["a", "b", "a"]}, 400, "repeats"),
        "oversized vocabulary": ({**good, "vocabulary": [f"c{i}" for i in range(51)]}, 413, "51 names"),
        "name too long": ({**good, "vocabulary": ["x" * 41]}, 400, "41 characters"),
        "unknown vocabulary_id": ({**without("vocabulary"), "vocabulary_id": "x"}, 400, "not loaded"),
        "vocabulary and vocabulary_id": ({**good, "vocabulary_id": "demo"}, 400, "not both"),
        "missing image": (without("image"), 422, "image: Field required"),
        "missing vocabulary": (without("vocabulary"), 400, "missing vocabulary"),
        "missing prompts": (without("boxes"), 400, "missing prompts"),
        "top_k 0": ({**good, "top_k": 0}, 422, "top_k"),
        "top_k not a number": ({**good, "top_k": "many"}, 422, "top_k"),
        "top_k a fraction": ({**good, "top_k": 2.5}, 422, "top_k"),
        "masks not a bool": ({**good, "masks": "yes"}, 422, "masks"),
        "a misspelt field": ({**good, "vocab": ["a"]}, 422, "vocab: Extra inputs"),
        "bad point label": ({**without("boxes"), "points": [[[20, 20, 3]]]}, 400, "label"),
        "point of 2 numbers": ({**without("boxes"), "points": [[[20, 20]]]}, 400, "[x, y, label]"),
        "malformed JSON": (('{"image": "abc", ', "application/json"), 400, "not valid JSON"),
        "JSON not an object": (("[1, 2]", "application/json"), 422, "the body"),
        "empty body": (("", "application/json"), 422, "the body"),
        "wrong content type": ((json.dumps(good), "text/plain"), 415, "Content-Type"),
        "form content type": (("image=abc", "application/x-www-form-urlencoded"), 415, "Content-Type"),
        "body too large": ({**good, "image": "A" * 1_200_000}, 413, "too large"),
    }


def test_every_bad_input_gets_a_4xx_naming_it_and_the_server_goes_on(server, images):
    image = b64(images[0])
    failures = []
    for name, (body, status, words) in bad_requests(image).items():
        if isinstance(body, tuple):
            response = httpx.post(f"{server}/predict", content=body[0], headers={"Content-Type": body[1]}, timeout=300)
        else:
            response = post(server, body)
        detail = response.json().get("detail") if response.headers.get("content-type") == "application/json" else None
        if response.status_code != status or not isinstance(detail, str) or words not in detail:
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)
    assert post(server, {"image": image, "boxes": [[10, 10, 50, 50]], "vocabulary": WORDS}).status_code == 200


def test_a_body_streamed_past_the_limit_is_refused_before_it_ends(server):
    sent = []

    def chunks():  # no Content-Length: the server counts what arrives
        for _ in range(64):
            sent.append(1)
            yield b"A" * 65536

    response = httpx.post(f"{server}/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    assert httpx.get(f"{server}/health").text == "ok"


def test_health_info_and_openapi(server):
    assert httpx.get(f"{server}/health").text == "ok"
    info = httpx.get(f"{server}/info").json()
    assert info["server"]["devices"] == ["cpu"] and info["server"]["workers_per_device"] == 1
    assert info["model"]["sam_type"] == "tiny"
    schema = httpx.get(f"{server}/openapi.json").json()
    body = schema["components"]["schemas"]["NamingRequestBody"]["properties"]
    assert "/predict" in schema["paths"] and set(body) >= {"image", "boxes", "points", "vocabulary_id", "top_k"}


def readme_curl_example() -> str:
    """The README's curl command (from ``curl`` to its here-document's end)."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"^(curl .*?^EOF)$", text, re.S | re.M)
    assert found, "README.md has no curl example"
    return found.group(1)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None, reason="no curl or base64 here")
def test_the_readme_curl_example_names_regions(server, demo_data, tmp_path):
    """The README's command as written (its port made the test server's), run by bash in a folder
    whose demo_out/data is the demo set, against a server that loaded the demo vocabulary."""
    command = readme_curl_example().replace("127.0.0.1:8000", server.removeprefix("http://"))
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "data").symlink_to(demo_data["root"])
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    regions = json.loads(proc.stdout)["regions"]
    names = set(demo_data["vocabulary"].read_text().split())
    assert regions and all(r["labels"] and set(r["labels"][0].split()) <= names and "mask" in r for r in regions)


def test_litserves_monitor_is_quiet_only_after_a_stop_signal():
    """A stop signal sent to the whole group ends LitServe's manager with this process; the monitor
    thread's failure on that closed pipe is dropped then and after the block (the thread runs on
    until the process exits), and reported before any stop."""

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    said, monitor, heard = [], logging.getLogger("litserve.server"), Said()
    monitor.addHandler(heard)  # LitServe's loggers do not propagate to the root
    with stops_as_keyboard_interrupt() as stops:
        monitor.error("Monitoring worker crashed")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # CPython runs the handler before the next statement
        monitor.error("Monitoring worker crashed")
        monitor.error("Worker LitServer-0 died; shutting down")
    monitor.error("Monitoring worker crashed")
    monitor.removeHandler(heard)
    for quiet in [f for f in monitor.filters if isinstance(f, MonitorQuietAfterStop)]:
        monitor.removeFilter(quiet)
    assert stops == [signal.SIGTERM]
    assert said == ["Monitoring worker crashed", "Worker LitServer-0 died; shutting down"]
