"""Bad input to ``evaluate`` (and ``demo.scenes``) ends in one ``error:`` line naming the file or
flag, exit code 2 and no traceback (``--print_config`` of each: tests/test_configs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regionspot_pl import evaluate
from regionspot_pl.demo import scenes
from regionspot_pl.evaluation.saved_logits import ImageLogits, LogitsWriter

GT = {
    "images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0}],
    "categories": [{"id": 3, "name": "cat"}],
}
GOOD = [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 10], "score": 0.9}]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """gt.json, good.json and the bad files the cases name."""
    files = {
        "gt.json": GT,
        "good.json": GOOD,
        "dict.json": {"annotations": GOOD},
        "empty.json": [],
        "unknown_image.json": [{**GOOD[0], "image_id": 7}],
        "no_score.json": [{k: v for k, v in GOOD[0].items() if k != "score"}],
        "bad_box.json": [{**GOOD[0], "bbox": [4, 4, -1, 10]}],
        "gt_no_categories.json": {k: v for k, v in GT.items() if k != "categories"},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "broken.json").write_text("[{not json")
    (tmp_path / "a_file").write_text("a file, not a folder")
    _logits_files(tmp_path)
    return tmp_path


def _logits_files(folder: Path) -> None:
    """logits.npz (one image of GT, without masks) as test --save_logits writes it, and bad copies."""
    writer = LogitsWriter([3])
    box = np.array([[4, 4, 24, 14]], np.float32)
    writer.add(ImageLogits(1, box, np.ones(1, np.float32), np.ones(1, np.float32), torch.zeros(1, 1), None))
    writer.write(folder / "logits.npz")
    with np.load(folder / "logits.npz") as npz:
        good = {k: npz[k] for k in npz.files}
    np.savez(folder / "old.npz", **{**good, "format": np.array(0, np.int64)})
    np.savez(folder / "no_iou.npz", **{k: v for k, v in good.items() if k != "iou"})
    np.savez(folder / "iou_2d.npz", **{**good, "iou": good["iou"][:, None]})
    np.savez(folder / "short_iou.npz", **{**good, "iou": np.ones(2, np.float32)})
    (folder / "text.npz").write_text("not a zip")


# argv (names relative to the folder, except flags and their values), fragments of the error line
EVALUATE_CASES = {
    "missing ground truth": (["nope.json", "good.json"], ["ground truth file not found", "nope.json"]),
    "ground truth not JSON": (["broken.json", "good.json"], ["broken.json is not valid JSON"]),
    "ground truth without categories": (
        ["gt_no_categories.json", "good.json"],
        ["gt_no_categories.json is not a COCO-format annotation file (it lacks 'categories')"],
    ),
    "missing results": (["gt.json", "nope.json"], ["results file not found", "nope.json"]),
    "results not JSON": (["gt.json", "broken.json"], ["results file", "broken.json is not valid JSON"]),
    "results a dict": (["gt.json", "dict.json"], ["results must be a JSON list"]),
    "results empty": (["gt.json", "empty.json"], ["results are empty"]),
    "results on unknown images": (["gt.json", "unknown_image.json"], ["image ids absent from the ground truth: [7]"]),
    "results without score": (["gt.json", "no_score.json"], ["1 lack 'score'"]),
    "results with a bad box": (["gt.json", "bad_box.json"], ["invalid 'bbox'"]),
    "unknown iou type": (["gt.json", "good.json", "--iou_type", "[bbox,mask]"], ["--iou_type", "bbox, segm, got mask"]),
    "max dets below 1": (["gt.json", "good.json", "--max_dets", "0"], ["--max_dets is 0", "must be >= 1"]),
    "unknown backend": (["gt.json", "good.json", "--metric_backend", "pycoco"], ["--metric_backend", "got pycoco"]),
    "unknown kind": (["gt.json", "good.json", "--kind", "voc"], ["--kind", "auto, lvis, coco, got voc"]),
    "out is a file name": (["gt.json", "good.json", "--out", "m.json"], ["--out is an output folder"]),
    "out inside a file": (["gt.json", "good.json", "--out", "@a_file/report"], ["a_file"]),
    "no files": ([], ["arguments are required: gt, results", "--help"]),
    "one file": (["gt.json"], ["arguments are required: results"]),
    "list flag given one word": (["gt.json", "good.json", "--iou_type", "segm"], ["--iou_type", "a list such as"]),
    "unknown scoring": (["gt.json", "logits.npz", "--scoring", "best"], ["--scoring", "regionspot, tap", "best"]),
    "scoring of a detections file": (["gt.json", "good.json", "--scoring", "tap"], ["good.json", "drop --scoring"]),
    "missing logits file": (["gt.json", "nope.npz"], ["logits file not found", "nope.npz"]),
    "logits file not a zip": (
        ["gt.json", "text.npz"],
        ["text.npz is not a logits file (not an .npz archive)", "--save_logits true"],
    ),
    "logits of another format": (["gt.json", "old.npz"], ["old.npz is of logits format 0", "--save_logits true"]),
    "logits without iou": (["gt.json", "no_iou.npz"], ["no_iou.npz lacks member 'iou'", "--save_logits true"]),
    "logits with a 2-d iou": (["gt.json", "iou_2d.npz"], ["member 'iou' is float32 (1, 1), expected float32 with 1"]),
    "logits with iou of other size": (["gt.json", "short_iou.npz"], ["sizes disagree", "iou (2,)"]),
    "masks from logits without": (
        ["gt.json", "logits.npz", "--iou_type", "[segm]"],
        ["logits.npz holds no masks", "--iou_type [bbox]"],
    ),
}


def _word(folder: Path, word: str) -> str:
    if word.startswith("@"):
        return str(folder / word[1:])
    return str(folder / word) if word.endswith((".json", ".npz")) else word


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_bad_input(folder, cli_error, case):
    argv, fragments = EVALUATE_CASES[case]
    cli_error(evaluate.main, [_word(folder, w) for w in argv], *fragments)


def test_evaluate_good_input_passes(folder, capsys):
    assert evaluate.main([str(folder / "gt.json"), str(folder / "good.json"), "--kind", "coco"]) == 0
    assert "AP" in capsys.readouterr().out
    for scoring in ("regionspot", "tap"):  # the good logits file, under either rule
        assert evaluate.main([str(folder / "gt.json"), str(folder / "logits.npz"), "--scoring", scoring]) == 0
        assert capsys.readouterr().out.startswith(f"scoring: {scoring} (")


def test_evaluate_takes_the_files_as_positionals_or_from_a_config(folder, capsys):
    config = folder / "eval.yaml"
    config.write_text(f"gt: {folder / 'gt.json'}\nresults: {folder / 'good.json'}\nkind: coco\n")
    assert evaluate.main(["--config", str(config)]) == 0
    assert evaluate.main([str(folder / "gt.json"), str(folder / "good.json"), "--config", str(config)]) == 0


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["OUT", "--num_val", "1"], ["--num_val >= 14"]),
        (["OUT", "--image_size", "32"], ["--image_size is 32", "must be >= 64"]),
        ([], ["arguments are required: out_dir"]),
    ],
    ids=["too few val images", "images too small", "no folder"],
)
def test_demo_scenes_bad_input(tmp_path, cli_error, argv, fragments):
    cli_error(scenes.main, [str(tmp_path / "demo") if w == "OUT" else w for w in argv], *fragments)
