"""The evaluation report: report.md, ap_per_class.png and ap_per_class.csv, from evaluate and test."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_metric_backends import make_set

from regionspot_pl import evaluate as evaluate_cli
from regionspot_pl import test as test_cli
from regionspot_pl.evaluation.metrics import evaluate_results
from regionspot_pl.evaluation.report import FREQUENCY_COLOURS, TOP, class_rows, write_report
from regionspot_pl.model import RegionSpotHead, save_head


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def colours_in(png: Path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def lvis_set() -> tuple[dict, list[dict]]:
    """60 LVIS-style images, box results; class 41 detected perfectly, so the best class is known."""
    gt, results = make_set(7, num_images=60)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results if r["category_id"] != 41]
    results += [
        {"image_id": a["image_id"], "category_id": 41, "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if a["category_id"] == 41
    ]
    return gt, results


def test_report_files_and_contents(lvis_set, tmp_path: Path) -> None:
    gt, results = lvis_set
    evaluations = {"bbox": evaluate_results(gt, results, "bbox")}
    paths = write_report(
        tmp_path / "out", evaluations, gt, {"ground truth": "gt.json", "results": "res.json"}, seconds=1.5
    )
    assert set(paths) == {"report", "plot", "csv"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "ap_per_class.png", "ap_per_class.csv"}

    # CSV: one row per category, in id order; AP as the evaluator's per-class AP; GT counts
    rows = read_csv(paths["csv"])
    assert list(rows[0]) == ["category_id", "name", "frequency", "AP_bbox", "gt_instances", "gt_images"]
    assert [int(r["category_id"]) for r in rows] == sorted(c["id"] for c in gt["categories"])
    instances = Counter(a["category_id"] for a in gt["annotations"])
    images = Counter(c for _, c in {(a["image_id"], a["category_id"]) for a in gt["annotations"]})
    ap = dict(zip(evaluations["bbox"].category_ids.tolist(), evaluations["bbox"].per_class_ap.tolist()))
    freq = {c["id"]: c["frequency"] for c in gt["categories"]}
    for r in rows:
        cid = int(r["category_id"])
        assert (r["frequency"], int(r["gt_instances"]), int(r["gt_images"])) == (freq[cid], instances[cid], images[cid])
        assert (r["AP_bbox"] == "") == math.isnan(ap[cid])
        if r["AP_bbox"]:
            assert float(r["AP_bbox"]) == pytest.approx(ap[cid], abs=1e-6)
    assert float(next(r for r in rows if r["category_id"] == "41")["AP_bbox"]) == 1.0

    text = paths["report"].read_text()
    for needed in (
        "| ground truth | `gt.json` |",
        "| results | `res.json` |",
        "| backend | hotcoco ",
        "| bbox detections | ",
        "| metric step | 1.5 s |",
        "## Metrics (AP, %)",
        "## AP by frequency group (%)",
        "| rare |",
        "| common |",
        "| frequent |",
        "](ap_per_class.png)",
        "(ap_per_class.csv)",
    ):
        assert needed in text, needed
    metrics = evaluations["bbox"].metrics
    assert f"| bbox | {100 * metrics['AP']:.1f} | {100 * metrics['AP50']:.1f} |" in text
    ranked = [r for r in class_rows(gt, evaluations) if not math.isnan(r.ap["bbox"])]
    n = min(TOP, len(ranked))
    best = text.split(f"## The {n} best classes")[1].split("##")[0]
    worst = text.split(f"## The {n} worst classes")[1].split("##")[0]
    assert best.count("\n| ") - 1 == n and worst.count("\n| ") - 1 == n  # header + n rows
    assert best.split("\n| 1 | ")[1].startswith("class_41 | 41 |")  # the perfect class first
    lowest = min(ranked, key=lambda r: (r.ap["bbox"], -r.instances, r.category_id))
    assert f"| {lowest.name} |" in worst.split("\n")[4]  # first row after the title, blank, header, rule

    # the plot: a real image, bars in the three frequency colours
    image = Image.open(paths["plot"])
    assert image.size == (800, 280)
    assert {hex_rgb(FREQUENCY_COLOURS[f]) for f in "rcf"} <= colours_in(paths["plot"])


def test_per_class_ap_matches_between_backends_in_the_csv(lvis_set, tmp_path: Path) -> None:
    gt, results = lvis_set
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    res_path = tmp_path / "res.json"
    res_path.write_text(json.dumps(results))
    tables = {}
    for backend in ("hotcoco", "lvis"):
        out = tmp_path / backend
        assert evaluate_cli.main([str(gt_path), str(res_path), "--metric_backend", backend, "--out", str(out)]) == 0
        tables[backend] = read_csv(out / "ap_per_class.csv")
        assert ("LVIS API (lvis)" in (out / "report.md").read_text()) == (backend == "lvis")
    assert [r["category_id"] for r in tables["hotcoco"]] == [r["category_id"] for r in tables["lvis"]]
    for a, b in zip(tables["hotcoco"], tables["lvis"]):
        assert (a["AP_bbox"] == "") == (b["AP_bbox"] == "")
        if a["AP_bbox"]:
            assert float(a["AP_bbox"]) == pytest.approx(float(b["AP_bbox"]), abs=1e-6)


def test_two_iou_types_two_panels_and_columns(tmp_path: Path) -> None:
    gt, results = make_set(8)
    evaluations = {t: evaluate_results(gt, results, t) for t in ("bbox", "segm")}
    paths = write_report(tmp_path, evaluations, gt, {"ground truth": "gt.json"})
    assert list(read_csv(paths["csv"])[0]) == [
        "category_id",
        "name",
        "frequency",
        "AP_bbox",
        "AP_segm",
        "gt_instances",
        "gt_images",
    ]
    assert Image.open(paths["plot"]).size == (800, 560)
    assert "| segm |" in paths["report"].read_text()
    with pytest.raises(ValueError, match="no evaluation to report"):
        write_report(tmp_path, {}, gt, {})


def test_test_cli_writes_the_report_with_either_backend(demo_data, demo_shards, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    head = save_head(RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4), tmp_path / "head.pt")
    metrics, tables = {}, {}
    for backend in ("hotcoco", "lvis"):
        out = tmp_path / backend
        flags = {"--shards": demo_shards["val"], "--annotations": demo_data["val_json"], "--head": head, "--out": out,
                 "--device": "cpu", "--text_cache": demo_shards["text_cache"], "--metric_backend": backend}  # fmt: skip
        argv = [str(word) for pair in flags.items() for word in pair]
        assert test_cli.main(argv) == 0
        printed = capsys.readouterr().out
        assert f"report: {out / 'report.md'}" in printed and f"plot: {out / 'ap_per_class.png'}" in printed
        report = (out / "report.md").read_text()
        assert f"| shards | `{demo_shards['val']}` |" in report and f"| head | `{head}` |" in report
        assert "detections_bbox.json" in report and "detections_segm.json" in report
        metrics[backend] = json.loads((out / "metrics.json").read_text())
        tables[backend] = read_csv(out / "ap_per_class.csv")
    for iou_type in ("bbox", "segm"):
        for key, value in metrics["lvis"][iou_type].items():
            other = metrics["hotcoco"][iou_type][key]
            assert (value is None and other is None) or other == pytest.approx(value, abs=1e-6), (iou_type, key)
    for a, b in zip(tables["hotcoco"], tables["lvis"], strict=True):
        for column in ("AP_bbox", "AP_segm"):
            assert (a[column] == "") == (b[column] == "")
            if a[column]:
                assert float(a[column]) == pytest.approx(float(b[column]), abs=1e-6)


def test_test_cli_rejects_an_unknown_backend_in_the_config(demo_data, demo_shards, tmp_path: Path, cli_error) -> None:
    config = tmp_path / "test.yaml"
    config.write_text(
        f"shards: {demo_shards['val']}\nannotations: {demo_data['val_json']}\nhead: unused.pt\n"
        "metric_backend: pycocotools\n"
    )
    cli_error(test_cli.main, ["--config", config], "got pycocotools", "hotcoco", "test.yaml")
