"""``make serve``, ``make app`` and ``make browser`` run to what they are for, in a small mode:
``make serve`` trains the demo in its quick mode where DEMO_OUT lacks it, then names a region over
HTTP (the one run of the default pair's quick demo in the suite); ``make app`` serves the page of
a DEMO_OUT that holds a head; ``make browser``'s three cases run with stand-ins for pip and the OS
package manager, so that nothing is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from demo_run import check_quick_demo
from serving import b64, free_port, running

ROOT = Path(__file__).resolve().parents[2]


def make_command(target: str, tmp_path: Path, **variables: str) -> list[str]:
    """``make TARGET`` in the repository with the install step taken as done (``-o STAMP``)."""
    stamp = tmp_path / "installed"
    settings = {"STAMP": str(stamp), "PY": sys.executable, **variables}
    return ["make", "--no-print-directory", "-C", str(ROOT), "-o", str(stamp), target,
            *(f"{k}={v}" for k, v in settings.items())]  # fmt: skip


def recorder(path: Path, log: Path) -> Path:
    """An executable that appends its arguments to ``log`` and succeeds."""
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> {log}\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("case", ["chromium on PATH", "root installs chromium", "says how"])
def test_make_browser(case, tmp_path):
    log = tmp_path / "calls.log"
    variables = {"PY": str(recorder(tmp_path / "python", log)), "APT": str(recorder(tmp_path / "apt-get", log))}
    variables.update({
        "chromium on PATH": {"CHROMIUM": "/opt/bin/chromium"},
        "root installs chromium": {"CHROMIUM": "", "OS_INSTALL": "yes"},
        "says how": {"CHROMIUM": "", "OS_INSTALL": ""},
    }[case])  # fmt: skip
    proc = subprocess.run(make_command("browser", tmp_path, **variables), capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[0].endswith("-m pip install -q -c constraints.txt -e .[dev,browser]"), calls
    if case == "chromium on PATH":
        assert proc.returncode == 0 and "Playwright with /opt/bin/chromium" in proc.stdout and len(calls) == 1
    elif case == "root installs chromium":
        assert proc.returncode == 0 and calls[1].endswith("apt-get install -y chromium"), (proc.stderr, calls)
    else:
        assert proc.returncode != 0 and len(calls) == 1
        assert "no chromium on PATH" in proc.stderr and "apt-get install chromium" in proc.stderr


@pytest.mark.slow
def test_make_serve_trains_the_quick_demo_then_names_a_region(tmp_path):
    demo_out = tmp_path / "demo_out"
    port = free_port()
    command = make_command("serve", tmp_path, DEMO_OUT=str(demo_out), DEMO_ARGS="--quick", ARGS=f"--port {port}")
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/health", tmp_path / "make.log", start_timeout=1200):
        image = sorted((demo_out / "data" / "images" / "val").glob("*.jpg"))[0]
        body = {"image": b64(image), "boxes": [[10, 10, 90, 90]], "vocabulary_id": "demo", "top_k": 3}
        response = httpx.post(f"{url}/predict", json=body, timeout=300)
    assert response.status_code == 200, response.text
    names = set((demo_out / "data" / "vocabulary.txt").read_text().splitlines())
    (region,) = response.json()["regions"]
    assert len(region["labels"]) == 3 and set(region["labels"]) <= names
    check_quick_demo((tmp_path / "make.log").read_text(), demo_out)  # the demo ran first


@pytest.fixture
def trained_demo_out(tiny_backbones, tiny_head, demo_data, tmp_path) -> Path:
    """A DEMO_OUT that already holds what ``make app`` reads (the session's tiny
    backbones and head, the demo data's vocabulary), so that the demo does not run first."""
    out = tmp_path / "demo_out"
    links = {
        "run/head.pt": tiny_head["file"],
        "backbones/sam_tiny.pth": tiny_backbones["sam_checkpoint"],
        "backbones/clip_tiny": tiny_backbones["clip_dir"],
        "data/vocabulary.txt": demo_data["vocabulary"],
    }
    for target, source in links.items():
        (out / target).parent.mkdir(parents=True, exist_ok=True)
        (out / target).symlink_to(source)
    return out


@pytest.mark.slow
def test_make_app_serves_the_page(trained_demo_out, tmp_path):
    port = free_port()
    command = make_command("app", tmp_path, DEMO_OUT=str(trained_demo_out), ARGS=f"--port {port}")
    with running(command, f"http://127.0.0.1:{port}/", tmp_path / "make.log"):
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=60).json()
    assert "RegionSpot" in json.dumps(config) and "[demo]" not in (tmp_path / "make.log").read_text()
