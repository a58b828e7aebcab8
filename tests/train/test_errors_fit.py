"""Bad input to ``fit``: exit code 2 and one ``error:`` line naming the flag or file, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from regionspot_pl.fit import main


@pytest.fixture(scope="module")
def inputs(demo_shards, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit_errors")
    newer = root / "newer"
    shutil.copytree(demo_shards["val"], newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    other_pair = root / "other_pair"  # the same widths, from another SAM
    shutil.copytree(demo_shards["val"], other_pair)
    manifest["backbones"]["sam"]["type"] = "vit_b"
    (other_pair / "manifest.json").write_text(json.dumps(manifest))
    other_gt = json.loads(demo_data["val_json"].read_text())
    other_gt["categories"] = sorted(other_gt["categories"], key=lambda c: c["id"])[:3]
    kept = {c["id"] for c in other_gt["categories"]}
    other_gt["annotations"] = [a for a in other_gt["annotations"] if a["category_id"] in kept]
    (root / "other_gt.json").write_text(json.dumps(other_gt))
    null_name = json.loads(demo_data["val_json"].read_text())
    null_name["images"][0]["file_name"] = None
    (root / "null_name_gt.json").write_text(json.dumps(null_name))
    (root / "unknown_key.yaml").write_text("data:\n  batch_size: 2\n  batchsize: 4\n")
    (root / "wrong_type.yaml").write_text("data:\n  batch_size: two\n")
    (root / "not_mapping.yaml").write_text("- a\n- b\n")
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint")
    return {
        "train": str(demo_shards["train"]),
        "val": str(demo_shards["val"]),
        "gt": str(demo_data["val_json"]),
        "root": root,
        "newer": str(newer),
        "other_pair": str(other_pair),
    }


def _argv(inputs, *extra, val=True):
    argv = ["--data.train_shards", f"[{inputs['train']}]", "--out", str(inputs["root"] / "run"), "--data.workers", "0"]
    if val:
        argv += ["--data.val_shards", inputs["val"], "--data.val_annotations", inputs["gt"]]
    return [*argv, *extra]


CASES = {
    "zero steps": (["--trainer.max_steps", "0"], ["--trainer.max_steps is 0", ">= 1"]),
    "steps not a number": (["--trainer.max_steps", "many"], ["--trainer.max_steps", "an integer, got many"]),
    "unknown variant": (["--model.variant", "XL"], ["--model.variant", "BL@336, got XL"]),
    "variant of another CLIP": (["--model.variant", "BL"], ["BL head", "width 128"]),
    "negative lr": (["--optim.lr", "-1"], ["--optim.lr is -1", ">= 0"]),
    "zero batch": (["--data.batch_size", "0"], ["--data.batch_size is 0"]),
    "negative workers": (["--data.workers", "-1"], ["--data.workers is -1"]),
    "unknown precision": (["--trainer.precision", "8-bit"], ["--trainer.precision", "8-bit"]),
    "unknown flag": (["--optim.learning_rate", "1"], ["unrecognized arguments: --optim.learning_rate"]),
    "old flag spelling": (["--max-steps", "1"], ["unrecognized arguments: --max-steps"]),
    "mix weights count": (["--data.mix_weights", "[1,2]"], ["--data.mix_weights", "give 1 finite"]),
    "mix weights not a list": (["--data.mix_weights", "1"], ["--data.mix_weights", "a list such as"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flag(case, inputs, cli_error):
    extra, fragments = CASES[case]
    cli_error(main, _argv(inputs, *extra), *fragments)


def test_missing_training_folder(inputs, cli_error):
    nowhere = str(inputs["root"] / "nowhere")
    cli_error(main, _argv(inputs) + ["--data.train_shards", f"[{nowhere}]"], "shard folder not found")


def test_missing_val_annotations(inputs, cli_error):
    missing = str(inputs["root"] / "missing.json")
    argv = _argv(inputs, val=False) + ["--data.val_shards", inputs["val"], "--data.val_annotations", missing]
    cli_error(main, argv, missing)


def test_val_shards_without_annotations(inputs, cli_error):
    cli_error(main, _argv(inputs, val=False) + ["--data.val_shards", inputs["val"]], "--data.val_annotations")


def test_val_annotations_of_another_vocabulary(inputs, cli_error):
    other = str(inputs["root"] / "other_gt.json")
    argv = _argv(inputs, val=False) + ["--data.val_shards", inputs["val"], "--data.val_annotations", other]
    cli_error(main, argv, other, inputs["val"], "lacks 37 of the 40 classes", "pass the annotation file")


def test_val_annotations_with_a_null_file_name(inputs, cli_error):
    """A malformed image record is refused in fit's validation reader too, naming it."""
    bad = str(inputs["root"] / "null_name_gt.json")
    image_id = json.loads((inputs["root"] / "null_name_gt.json").read_text())["images"][0]["id"]
    argv = _argv(inputs, val=False) + ["--data.val_shards", inputs["val"], "--data.val_annotations", bad]
    cli_error(main, argv, bad, f"image #0 (id {image_id})", "has file_name None", "as 'file_name'")


def test_shards_of_a_newer_format(inputs, cli_error):
    cli_error(main, _argv(inputs, val=False) + ["--data.train_shards", f"[{inputs['newer']}]"], "upgrade regionspot_pl")


def test_shards_of_two_frozen_pairs_are_not_mixed(inputs, cli_error):
    argv = _argv(inputs, val=False) + ["--data.train_shards", f"[{inputs['train']},{inputs['other_pair']}]"]
    line = cli_error(main, argv, "different frozen pairs", "re-extract them with one SAM")
    assert f"{inputs['train']}: SAM tiny" in line and f"{inputs['other_pair']}: SAM vit_b" in line


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("unknown_key.yaml", "data.batchsize"), ("wrong_type.yaml", "got two"), ("not_mapping.yaml", "mapping")],
)
def test_bad_config_file(name, fragment, inputs, cli_error):
    cli_error(main, ["--config", str(inputs["root"] / name)], fragment, name)


def test_missing_config_file_and_unknown_stage(inputs, cli_error):
    cli_error(main, ["--config", str(inputs["root"] / "none.yaml")], "config file not found")
    cli_error(main, ["--stage", "nope"], "./configs/fit/nope.yaml", "warmup")


def test_missing_init_head_and_unreadable_resume(inputs, cli_error):
    cli_error(main, _argv(inputs, "--init_from", str(inputs["root"] / "none.pt")), "none.pt")
    cli_error(main, _argv(inputs, "--resume", "last"), "cannot resume")
    cli_error(main, _argv(inputs, "--resume", str(inputs["root"] / "garbage.ckpt")), "not a readable")


def test_a_stalled_read_is_an_error_line_not_a_traceback(inputs, tmp_path, cli_error):
    stalled = tmp_path / "stalled"
    stalled.mkdir()
    shutil.copy(f"{inputs['train']}/manifest.json", stalled)
    (stalled / "shards.txt").write_text("pipe:sleep 30\n")  # a mount or pipe that never delivers
    argv = ["--data.train_shards", f"[{stalled}]", "--out", str(tmp_path / "run"), "--data.read_timeout", "2"]
    argv += ["--data.workers", "1", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]
    cli_error(main, argv, "--data.read_timeout 2", "--resume last")
