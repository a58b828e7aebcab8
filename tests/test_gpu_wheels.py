"""``make gpu-wheels`` (scripts/gpu_wheels.sh): the wheels that a GPU machine without network access
needs, whose Python 3.12 already has torch. Every carried name is pinned in constraints.txt, once
(read without network); a name without a pin fails the run before anything is fetched; the target
itself, restricted to three small packages (a pure-Python wheel, a compiled one, and a source-only
package that is built here), writes into a temporary folder one wheel of each at its pin that
installs on CPython 3.12 x86_64 manylinux, fetches on a second run only what is missing, and
removes another version of one. The registry is needed for that last test only, which skips when pip cannot reach it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_wheels.sh"
# a pure-Python wheel, a compiled (abi3) one, and a package published only as source
SMALL = ["braceexpand", "pycocotools", "antlr4-python3-runtime"]
# the tags a wheel may carry to install on the GPU machine's CPython 3.12 (x86_64, glibc up to 2.39)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
CP312 = set(cpython_tags((3, 12), platforms=PLATFORMS)) | set(compatible_tags((3, 12), "cp312", PLATFORMS))


def pins() -> dict[str, str]:
    """{canonical name: version} of constraints.txt's NAME==VERSION lines."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def script_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHEELS_")}
    return {**env, "PYTHON": sys.executable, **variables}


def test_every_carried_name_is_pinned_once():
    proc = subprocess.run(["bash", str(SCRIPT), "--print"], cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    carried = [line.split("==") for line in proc.stdout.split()]
    names = [canonicalize_name(name) for name, _ in carried]
    assert len(names) == len(set(names)), "a name is listed twice"
    pinned = pins()
    assert {name: version for name, (_, version) in zip(names, carried)} == {name: pinned[name] for name in names}
    # what the machine lacks for SAM 2.1, the metrics, the command line and the server
    assert {"sam2", "hydra-core", "lvis", "hotcoco", "jsonargparse", "huggingface-hub", "litserve"} <= set(names)
    # what it has: carried, these would only shadow its own build
    assert not {"torch", "torchvision", "numpy", "pillow", "tokenizers", "safetensors"} & set(names)


def test_an_unpinned_name_fails_before_anything_is_fetched(tmp_path):
    dest = tmp_path / "whl"
    env = script_env(WHEELS_DIR=str(dest), WHEELS_PACKAGES="braceexpand not-a-pinned-package")
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no NAME==VERSION pin in constraints.txt for: not-a-pinned-package" in proc.stderr
    assert not dest.exists()


def registry_reachable(tmp_path: Path) -> bool:
    """Whether pip can fetch anything at all: one small pinned wheel, for this interpreter."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
           str(tmp_path / "probe"), f"braceexpand=={pins()['braceexpand']}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0


def make_gpu_wheels(dest: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``make gpu-wheels`` restricted to SMALL, into ``dest``, with the install step taken as done."""
    stamp = tmp_path / "installed"
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", str(stamp), f"STAMP={stamp}", f"PY={sys.executable}",
           "gpu-wheels", f"WHEELS_DIR={dest}", "WHEELS_PACKAGES=" + " ".join(SMALL)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=script_env())


def test_make_gpu_wheels_writes_pinned_cp312_wheels_once(tmp_path):
    dest = tmp_path / "whl"
    proc = make_gpu_wheels(dest, tmp_path)
    if proc.returncode != 0 and not registry_reachable(tmp_path):
        pytest.skip("pip cannot reach the package registry: make gpu-wheels downloads from it")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "building it from source" in proc.stdout  # antlr4-python3-runtime has no wheel on the registry

    pinned = pins()
    wheels = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in dest.glob("*.whl")}
    assert set(wheels) == {canonicalize_name(name) for name in SMALL}
    for name, path in wheels.items():
        _, version, _, tags = parse_wheel_filename(path.name)
        assert str(version) == pinned[name] and tags & CP312, path.name
        with zipfile.ZipFile(path) as wheel:  # a real wheel: its metadata says the same
            info = f"{path.name.split('-')[0]}-{version}.dist-info"
            metadata = wheel.read(f"{info}/METADATA").decode()
            assert re.search(rf"^Version: {re.escape(pinned[name])}$", metadata, re.M)
            assert canonicalize_name(re.search(r"^Name: (.+)$", metadata, re.M).group(1)) == name
            assert {line.split(": ", 1)[1] for line in wheel.read(f"{info}/WHEEL").decode().splitlines()
                    if line.startswith("Tag: ")} == {str(tag) for tag in tags}  # fmt: skip
    assert "abi3" in wheels["pycocotools"].name and "cp312" in wheels["pycocotools"].name  # not this Python's

    # a second run fetches only what is missing: here braceexpand, of which another version (an older
    # pin, say) is there, and is removed, as two versions of one package stop the install there
    stale = dest / wheels["braceexpand"].name.replace(pinned["braceexpand"], "0.1.1")
    wheels["braceexpand"].rename(stale)
    kept = {p: p.stat().st_mtime_ns for name, p in wheels.items() if name != "braceexpand"}
    again = make_gpu_wheels(dest, tmp_path)
    assert again.returncode == 0, f"{again.stdout[-3000:]}\n{again.stderr[-3000:]}"
    assert again.stdout.count("gpu_wheels: have ") == len(kept) and f"got {wheels['braceexpand'].name}" in again.stdout
    assert f"removing {stale.name}" in again.stdout and not stale.exists()
    assert sorted(dest.glob("*.whl")) == sorted(wheels.values())
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
