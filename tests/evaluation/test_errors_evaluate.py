"""Bad input to ``evaluate`` (and ``demo.scenes``) ends in one ``error:`` line naming the file or
flag, exit code 2 and no traceback (``--print_config`` of each: tests/test_configs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regionspot_pl import evaluate
from regionspot_pl.demo import scenes

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
    return tmp_path


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
}


def _word(folder: Path, word: str) -> str:
    if word.startswith("@"):
        return str(folder / word[1:])
    return str(folder / word) if word.endswith(".json") else word


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_bad_input(folder, cli_error, case):
    argv, fragments = EVALUATE_CASES[case]
    cli_error(evaluate.main, [_word(folder, w) for w in argv], *fragments)


def test_evaluate_good_input_passes(folder, capsys):
    assert evaluate.main([str(folder / "gt.json"), str(folder / "good.json"), "--kind", "coco"]) == 0
    assert "AP" in capsys.readouterr().out


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
