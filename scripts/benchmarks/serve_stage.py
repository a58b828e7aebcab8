"""Serving: ``python -m regionspot_pl.serve`` on the tiny backbones, over HTTP on 127.0.0.1, with 16
concurrent clients.

- throughput with LitServe's batching (``--max_batch_size 8``) against one request at a time
  (``--max_batch_size 1``), every request a new image (so both image encoders run), one server up
  at a time (an idle batching worker polls its queue every millisecond), in alternating rounds;
- latency p50 / p99 of those requests;
- a second round of prompts on the same images (features from the image cache) against the first;
- the server's memory (PSS of all its processes) before and during 2,000 requests that keep both
  caches evicting (images and vocabularies cycling over twice what the caches hold).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from regionspot_pl.model import RegionSpotHead, save_head

from .common import Table, now

CLIENTS = 16
BOXES = [[20.0, 30.0, 120.0, 140.0], [100.0, 60.0, 220.0, 200.0], [10.0, 150.0, 90.0, 250.0]]
START_TIMEOUT_S = 600


@dataclass(frozen=True)
class ServeSizes:
    """Requests per measurement (throughput rounds, prompt rounds, the memory run) and the
    server's cache sizes."""

    requests: int = 160
    rounds: int = 2
    prompt_images: int = 16
    memory_requests: int = 2000
    image_cache: int = 16
    text_cache_entries: int = 8
    warmup: int = 16


QUICK = ServeSizes(
    requests=16, rounds=1, prompt_images=2, memory_requests=32, image_cache=2, text_cache_entries=2, warmup=2
)


def unique_images(paths: list[Path], count: int, seed: int) -> list[str]:
    """``count`` PNG files (base64), each a demo image with one pixel set from (seed, index), so that
    no two are the same file: each is a new image to the server's cache."""
    out = []
    for i in range(count):
        with Image.open(paths[i % len(paths)]) as image:
            pixels = np.array(image.convert("RGB"))
        pixels[0, 0] = [seed % 256, i % 256, (i // 256) % 256]
        pixels[0, 1] = [seed // 256 % 256, 7, 11]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def body(image: str, boxes: list[list[float]] = BOXES, words: list[str] | None = None) -> dict:
    request = {"image": image, "boxes": boxes, "top_k": 5}
    request.update({"vocabulary": words} if words else {"vocabulary_id": "demo"})
    return request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(flags: list[str], log: Path) -> Iterator[tuple[str, int]]:
    """``python -m regionspot_pl.serve flags`` in its own process group: (url, pid) once healthy."""
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "regionspot_pl.serve", *flags, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = now() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or now() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)  # waiting for readiness, not timing
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def memory_mb(pid: int) -> float:
    """Memory of ``pid`` and every process under it, in MB: the sum of their proportional set sizes
    (a page shared by k of them counts 1/k in each, so forked processes are not counted twice)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grown = {pid}, True
    while grown:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    total_kb = 0
    for p in tree:
        try:
            lines = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
        except OSError:  # gone meanwhile
            continue
        total_kb += sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))
    return total_kb / 1024


def fire(url: str, bodies: list[dict], clients: int = CLIENTS) -> tuple[float, list[float]]:
    """All ``bodies`` from ``clients`` concurrent clients: (seconds in all, each request's seconds)."""
    local = threading.local()

    def send(request: dict) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        start = now()
        response = local.client.post(f"{url}/predict", json=request)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        return now() - start

    start = now()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(send, bodies))
    return now() - start, latencies


def measure_round(url: str, images: list[Path], sizes: ServeSizes, seed: int) -> tuple[float, list[float]]:
    """Warm-up (the demo vocabulary's text embeddings, first calls), then ``sizes.requests`` requests
    on new images: (seconds in all, each request's seconds)."""
    fire(url, [body(image) for image in unique_images(images, sizes.warmup, seed=10_000 + seed)])
    return fire(url, [body(image) for image in unique_images(images, sizes.requests, seed=seed)])


def summary(seconds: float, latencies: list[float], requests: int) -> dict[str, float]:
    return {"per_s": requests / seconds, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}  # fmt: skip


def prompt_rounds(url: str, images: list[Path], count: int) -> tuple[float, float]:
    """Mean seconds of one client's requests: first round (new images), second (same images, other
    boxes: features from the image cache)."""
    files = unique_images(images, count, seed=1000)
    first, _ = fire(url, [body(image) for image in files], clients=1)
    second, _ = fire(url, [body(image, [[b + 5 for b in box] for box in BOXES]) for image in files], clients=1)
    return first / count, second / count


def memory(url: str, pid: int, images: list[Path], sizes: ServeSizes) -> list[float]:
    """Memory (MB) before ``memory_requests`` requests and after each quarter of them: one box each,
    over twice the images and vocabularies the caches hold, each used for 4 requests in a row (a new
    one every 4th request), so that both caches keep evicting."""
    files = unique_images(images, 2 * sizes.image_cache, seed=2000)
    vocabularies = [[f"shape {v} {i}" for i in range(5)] for v in range(2 * sizes.text_cache_entries)]
    bodies = [
        body(files[i // 4 % len(files)], BOXES[:1], vocabularies[i // 4 % len(vocabularies)])
        for i in range(sizes.memory_requests)
    ]
    used = [memory_mb(pid)]
    quarter = -(-len(bodies) // 4)
    for start in range(0, len(bodies), quarter):
        fire(url, bodies[start : start + quarter])
        used.append(memory_mb(pid))
    return used


@dataclass(frozen=True)
class ServedModel:
    """What the server loads: the segmenter (``--sam_type`` and checkpoint), the CLIP folder, a
    random head of the CLIP's widths (``head_variant``, else the tiny CLIP's), and the device."""

    label: str
    sam_type: str
    sam_checkpoint: Path
    clip_dir: Path
    head_variant: str | None = None
    device: str = "cpu"

    def flags(self, folder: Path) -> list[str]:
        """The server's model flags, the head written into ``folder`` first."""
        torch.manual_seed(0)
        head = (
            RegionSpotHead.from_variant(self.head_variant)
            if self.head_variant
            else RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4)
        )
        path = save_head(head.eval(), folder / "head.pt")
        return ["--head", str(path), "--sam_type", self.sam_type, "--sam_checkpoint", str(self.sam_checkpoint),
                "--clip_model", str(self.clip_dir), "--device", self.device]  # fmt: skip


def tiny_served_model(backbones: dict) -> ServedModel:
    """The tiny SAM and CLIP of ``write_tiny_backbones`` on the CPU."""
    return ServedModel("tiny SAM+CLIP", "tiny", backbones["sam_checkpoint"], backbones["clip_dir"])


def bench_serving(table: Table, out: Path, data: dict, model: ServedModel, sizes: ServeSizes) -> dict:
    """The serving rows of the table (see the module docstring)."""
    folder = out / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    flags = [*model.flags(folder), "--text_cache", str(folder / "text.h5"),
             "--vocabulary", f"[demo={data['vocabulary']}]", "--image_cache", str(sizes.image_cache),
             "--text_cache_entries", str(sizes.text_cache_entries), "--batch_timeout", "0.01"]  # fmt: skip
    images = sorted(Path(data["val_images"]).glob("*.jpg"))
    batch = {"batched": ["--max_batch_size", "8"], "single": ["--max_batch_size", "1"]}
    seconds, latencies = dict.fromkeys(batch, 0.0), {name: [] for name in batch}
    for r in range(sizes.rounds):  # one server at a time (an idle one polls its queue), alternating
        for name in ("single", "batched"):
            with server([*flags, *batch[name]], folder / f"{name}.log") as (url, pid):
                wall, each = measure_round(url, images, sizes, seed=1 + 2 * r + (name == "batched"))
                seconds[name] += wall
                latencies[name] += each
                if name == "batched" and r == sizes.rounds - 1:
                    first, second = prompt_rounds(url, images, sizes.prompt_images)
                    used = memory(url, pid, images, sizes)
    rates = {name: summary(seconds[name], latencies[name], sizes.rounds * sizes.requests) for name in batch}
    report(table, model.label, rates, (first, second), used, sizes)
    return {"rates": rates, "prompt_rounds_s": [first, second], "memory_mb": used}


def report(table: Table, label: str, rates: dict, rounds: tuple[float, float], used: tuple, sizes: ServeSizes) -> None:
    batched, single = rates["batched"], rates["single"]
    table.add(
        f"serve: {CLIENTS} clients, a new image each request ({label}), --max_batch_size 8 vs 1",
        f"{batched['per_s']:.1f} req/s", f"{single['per_s']:.1f} req/s (batch 1)", batched["per_s"] / single["per_s"],
        requests=sizes.requests * sizes.rounds, **{f"batched_{k}": v for k, v in batched.items()},
        **{f"single_{k}": v for k, v in single.items()},
    )  # fmt: skip
    table.add(
        f"serve: latency p50 / p99 at {CLIENTS} clients, --max_batch_size 8 vs 1",
        f"{batched['p50_ms']:.0f} / {batched['p99_ms']:.0f} ms", f"{single['p50_ms']:.0f} / {single['p99_ms']:.0f} ms",
        single["p50_ms"] / batched["p50_ms"],
    )  # fmt: skip
    first, second = rounds
    table.add(
        "serve: a second prompt round on an image (cached features, no encoder) vs the first, one client",
        f"{1000 * second:.0f} ms/request", f"{1000 * first:.0f} ms/request (first round)", first / second,
        first_s=first, second_s=second, images=sizes.prompt_images,
    )  # fmt: skip
    before, *after = used
    quarters = ", ".join(f"{m:.0f}" for m in after)
    table.add(
        f"serve: server memory (PSS, all processes) after {sizes.memory_requests} requests vs after the first quarter",
        f"{after[-1]:.0f} MB", f"{after[0]:.0f} MB ({before:.0f} before; each quarter: {quarters})",
        100 * after[-1] / after[0], ratio_fmt="{:.1f}%", before_mb=before, after_quarters_mb=after,
    )  # fmt: skip
