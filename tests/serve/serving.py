"""Helpers of the server and page tests: a free port, base64 of a file, the model flags of the
session's tiny backbones and head, a command started in its own process group and stopped (with
every process it started) at the end, and the comparison of an answer with the Predictor's."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from pycocotools import mask as mask_utils
from tolerances import assert_masks_agree, probability_rtol, reordering_atol

SRC = Path(__file__).resolve().parents[2] / "src"
# a bound only a hung start meets: a start takes seconds to tens of seconds on 2 busy cores
START_TIMEOUT_S = 300.0
# the tiny head's longest reduction (its MLP's hidden width); SAM's decoder's (its MLP's)
HEAD_K, DECODER_K = 256, 2048


def b64(source: Path | bytes) -> str:
    return base64.b64encode(source if isinstance(source, bytes) else Path(source).read_bytes()).decode()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_flags(head: Path, backbones: dict[str, Path], text_cache: Path) -> list[str]:
    return ["--head", str(head), "--sam_type", "tiny", "--sam_checkpoint", str(backbones["sam_checkpoint"]),
            "--clip_model", str(backbones["clip_dir"]), "--text_cache", str(text_cache)]  # fmt: skip


def environment() -> dict[str, str]:
    """This process's environment with the checkout's source first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip


@contextmanager
def running(
    command: list[str], ready_url: str, log: Path, start_timeout: float = START_TIMEOUT_S
) -> Iterator[subprocess.Popen]:
    """``command`` in a process group of its own until the block ends; yields once ``ready_url``
    answers 200. At the end the group gets SIGTERM (SIGKILL if it is not gone in 60 s)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment(),
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            assert proc.poll() is None, f"{command[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in {start_timeout} s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(ready_url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling for readiness, not racing a result
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the process's group, then its exit code (SIGKILL after 60 s)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def python_module(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def check_answer(regions: list[dict], results: list[dict], embeddings: torch.Tensor | None = None) -> None:
    """An answer's regions against ``Predictor.predict`` results (and ``region_embeddings``): the
    same code on the same inputs in another process, so within the float reordering a thread count
    may bring (tests/tolerances.py)."""
    assert len(regions) == len(results)
    for n, (region, result) in enumerate(zip(regions, results)):
        assert region["labels"] == result["labels"], n
        expected = torch.tensor(result["scores"])
        torch.testing.assert_close(torch.tensor(region["scores"]), expected, rtol=probability_rtol(HEAD_K), atol=1e-7)
        iou = torch.tensor([result["iou"]])
        torch.testing.assert_close(torch.tensor([region["iou"]]), iou, rtol=0, atol=reordering_atol(iou, DECODER_K))
        if result["box"] is not None:
            assert region["box"] == result["box"]
        if "mask" in region:
            got = torch.from_numpy(mask_utils.decode(region["mask"]).astype(bool))
            assert_masks_agree(got, torch.from_numpy(result["mask"]))
        if embeddings is not None:
            got = torch.tensor(region["embedding"])
            torch.testing.assert_close(got, embeddings[n], rtol=0, atol=reordering_atol(embeddings[n], HEAD_K))
        else:
            assert "embedding" not in region


def points_as_prompts(points: list[list[list[float]]]) -> dict:
    """Request points (per region [[x, y, label], ...]) -> Predictor.predict's keyword arguments."""
    return {"point_coords": [[p[:2] for p in region] for region in points],
            "point_labels": [[p[2] for p in region] for region in points]}  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
