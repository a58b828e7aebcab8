"""Every script and make target runs to its end in a small mode, so that a change of the package's
interface that breaks one fails here. The make targets run through make itself (their command
lines as the Makefile writes them, with this interpreter and the install step taken as done);
the other scripts as `python scripts/NAME.py ARGS` runs them. `make bench` runs scripts/bench.py
(and scripts/bench_host.py), `make bench-real` scripts/bench_real.py, `make demo` scripts/demo.py;
`make serve`, `make app` and `make browser` are run by tests/serve/test_make_targets.py."""

from __future__ import annotations

import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_run import check_quick_demo
from PIL import Image

from regionspot_pl.convert import main as convert_main
from regionspot_pl.data.records import load_coco
from regionspot_pl.model import RegionSpotHead, load_head, save_head

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# a bound that only a hung run meets: each of these takes seconds to tens of seconds on 2 cores
HANG_S = 600


def make(target: str, args: list[str], stamp: Path) -> str:
    """`make TARGET ARGS="..."` in the repository with this Python; ``-o STAMP`` takes the install
    step as done, so that nothing is installed. Returns stdout; fails with the output's tail."""
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", str(stamp), f"STAMP={stamp}",
           f"PY={sys.executable}", target, "ARGS=" + " ".join(args)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def run_script(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``python scripts/NAME argv`` in this process (the script's own ``__main__`` block); its exit code."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return stop.value.code


def stages(rows: list[dict]) -> set[str]:
    return {row["stage"].split(":")[0] for row in rows}


@pytest.mark.slow
def test_make_bench_quick_runs_every_stage_but_serving(tmp_path):
    """Every stage but serving, whose code (``serve_stage.bench_serving``, two servers) runs in
    make bench-real's tiny mode below: once in the suite is enough for the slowest stage."""
    out = tmp_path / "bench"
    quick = ["--quick", "--out", str(out), "--stages", "metrics", "extract", "load", "flops", "train", "eval"]
    printed = make("bench", quick, tmp_path / "installed")
    report = json.loads((out / "bench.json").read_text())
    assert report["quick"] and stages(report["rows"]) == {"eval", "extract", "cpu", "load", "flops", "train"}
    assert all(row["ratio"] != "nan" for row in report["rows"])
    assert "| stage" in printed and "host path per image" in printed  # the table, then bench_host.py


@pytest.mark.slow
def test_make_bench_real_tiny_runs_every_stage(tmp_path, tiny_backbones):
    out = tmp_path / "real"
    (out / "tiny").mkdir(parents=True)  # the session's tiny backbones, as bench-real's tiny mode finds them
    for path in tiny_backbones.values():
        (out / "tiny" / path.name).symlink_to(path)
    printed = make("bench-real", ["--tiny", "--device", "cpu", "--out", str(out)], tmp_path / "installed")
    report = json.loads((out / "bench_real.json").read_text())
    rows = report["rows"]
    assert not [(r["stage"], r["ours"]) for r in rows if r["stage"].endswith(": failed")]
    assert stages(rows) == {"real extract (cpu)", "real profile (cpu)", "real segmenter (cpu)", "real train (cpu)",
                            "real load", "fit (cpu)", "serve"}  # fmt: skip
    extract = [r["raw"] for r in rows if r["stage"].startswith("real extract")]
    assert {(r["sam_type"].rsplit("/", 1)[-1], r["precision"], r["batch"]) for r in extract} == {
        (sam, "fp32", 2) for sam in ("tiny", "sam2.1_hiera_tiny_random.yaml")
    }
    assert all(r["tflop_per_image"] > 0 and r["images_per_s"] > 0 for r in extract)
    profiled = [r for r in rows if r["stage"].startswith("real profile")]  # SAM, the first precision, batch 2
    assert [r["stage"].split(", ", 1)[1] for r in profiled] == ["batch 2, --precision fp32"]
    assert profiled[0]["raw"] == json.loads((out / "profile" / "summary.json").read_text())
    assert profiled[0]["raw"]["wall_s"] > 0 and profiled[0]["raw"]["gpu_idle_fraction"] is None  # no GPU
    segmenters = [r["raw"] for r in rows if r["stage"].startswith("real segmenter")]
    assert [r["sam_type"].rsplit("/", 1)[-1] for r in segmenters] == ["tiny", "sam2.1_hiera_tiny_random.yaml"]
    for raw in segmenters:
        assert raw["encoder_ms_per_image"] > 0 and raw["decoder_ms_per_box"] > 0 and raw["boxes_per_image"] > 0
    # fit's own train on the synthetic cache with workers 0 and 2, then under DDP (gloo on a CPU)
    fits = [r["raw"] for r in rows if r["stage"].startswith("fit")]
    assert [(r["workers"], r["strategy"], r["backend"]) for r in fits][:2] == [
        (0, "SingleDeviceStrategy", None),
        (2, "SingleDeviceStrategy", None),
    ]
    assert (fits[2]["strategy"], fits[2]["backend"]) == ("DDPStrategy", "gloo") and fits[2]["vs_without_ddp"] > 0
    assert all(r["images"] > 0 and r["images_per_s"] > 0 for r in fits)
    serving = next(r["raw"] for r in rows if r["stage"].startswith("serve: 16 clients"))
    assert serving["batched_per_s"] > 0 and serving["single_per_s"] > 0
    lines = (out / "bench_real.md").read_text().splitlines()
    assert lines[0].startswith("- **Device:** ") and "fp32" in lines[0] and "bf16" in lines[0]
    assert lines[1].startswith("- **Command:** `python scripts/bench_real.py --tiny --device cpu --out ")
    assert "| stage" in printed


def test_bench_real_lists_what_a_spent_budget_skips(tmp_path, monkeypatch):
    """A stage (or setting) that would start past its share of --budget-s is a row saying so, not a run."""
    code = run_script("bench_real.py", ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "1e-9",
                                        "--stages", "segmenters", "serve"], monkeypatch)  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "bench_real.json").read_text())["rows"]
    assert [(r["stage"], r["ours"]) for r in rows] == [
        ("real segmenter (cpu)", "skipped: time budget spent"),
        ("serve (cpu)", "skipped: time budget spent"),
    ]


@pytest.mark.slow
def test_make_demo_quick_runs_every_stage_on_another_pair(tmp_path):
    """The default pair's quick demo runs in tests/serve/test_make_targets.py (``make serve``
        trains it first); here the pair options, which put the run in a subfolder of its own (every pair's
    stages run in tests/test_pairs.py)."""
    printed = make("demo", ["--quick", "--out", str(tmp_path / "demo"), "--sam", "sam", "--clip", "siglip"],
                   tmp_path / "installed")  # fmt: skip
    check_quick_demo(printed, tmp_path / "demo" / "sam+siglip", "sam", "siglip")


@pytest.mark.slow
def test_bench_metrics_script(tmp_path, monkeypatch, capsys):
    # make bench's metric step runs both backends on boxes; here the script's own options, masks included
    argv = ["--scale", "0.001", "--iou-type", "bbox", "segm", "--backends", "hotcoco", "--work", str(tmp_path)]
    assert run_script("bench_metrics.py", argv, monkeypatch) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["images"] == 20 and not report["failed"]
    assert set(report["runs"]["hotcoco"]["metrics"]) == {"bbox", "segm"}


def test_head_to_official_writes_the_reference_layout(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    head = RegionSpotHead(clip_dim=64, text_dim=32, ffn_dim=64, num_heads=4)
    path = save_head(head, tmp_path / "head.pt")
    out = tmp_path / "official" / "head.pth"
    assert run_script("head_to_official.py", [str(path), str(out)], monkeypatch) == 0
    saved = torch.load(out, weights_only=True)["model"]
    assert saved.keys() == {f"model.{k}" for k in head.state_dict()}
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in head.state_dict().items())
    # convert reads it back to the same head
    assert convert_main([str(out), str(tmp_path / "back.pt")]) == 0
    back = load_head(tmp_path / "back.pt").state_dict()
    assert all(torch.equal(back[k], v) for k, v in head.state_dict().items())
    assert run_script("head_to_official.py", [str(tmp_path / "none.pt"), str(out)], monkeypatch) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_openimages_to_coco_gives_annotations_extract_reads(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("a1", (200, 100)), ("b2", (64, 128))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(images / f"{name}.jpg")
    classes = tmp_path / "classes.csv"
    classes.write_text("/m/cat,Cat\n/m/dog,Dog\n")
    boxes = tmp_path / "boxes.csv"
    with boxes.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf"])
        writer.writerow(["a1", "/m/dog", "0.1", "0.5", "0.2", "0.6", "0"])
        writer.writerow(["a1", "/m/cat", "0", "1", "0", "1", "1"])
        writer.writerow(["b2", "/m/cat", "0.25", "0.75", "0.5", "1", "0"])
    out = tmp_path / "coco.json"
    argv = ["--boxes", str(boxes), "--classes", str(classes), "--images", str(images), "--out", str(out)]
    assert run_script("openimages_to_coco.py", argv, monkeypatch) == 0
    records, vocab, _ = load_coco(out)
    assert list(vocab.names) == ["Cat", "Dog"]
    by_size = {(r.width, r.height): r for r in records}
    np.testing.assert_allclose(by_size[(200, 100)].boxes, [[20, 20, 100, 60]])  # the group box is skipped
    np.testing.assert_allclose(by_size[(64, 128)].boxes, [[16, 64, 48, 128]])
