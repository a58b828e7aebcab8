"""Bad input to ``predict`` and ``convert`` ends in one ``error:`` line naming the file or flag,
exit code 2 and no traceback (``--print_config`` of each: tests/test_configs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_pl import convert
from regionspot_pl.model import RegionSpotHead, load_head, save_head
from regionspot_pl.predict import cli as predict

VOCAB = "red circle,blue square,background"


@pytest.fixture(scope="module")
def files(tiny_backbones, tmp_path_factory) -> dict[str, Path]:
    """A head that fits the tiny CLIP, one that does not, an image, and broken files."""
    root = tmp_path_factory.mktemp("errors_predict")
    torch.manual_seed(0)
    out = {
        "head": save_head(RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4), root / "head.pt"),
        "wrong_head": save_head(RegionSpotHead(clip_dim=96, text_dim=64, ffn_dim=256, num_heads=4), root / "bb.pt"),
        "image": root / "scene.png",
        "corrupt_image": root / "corrupt.jpg",
        "garbage": root / "garbage.pt",
        "no_model": root / "no_model.pth",
        "a_file": root / "a_file",
        "empty_dir": root / "empty",
        "text_cache": root / "text.h5",
        **tiny_backbones,
    }
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(out["image"])
    out["corrupt_image"].write_bytes(b"\xff\xd8 not a jpeg")
    out["garbage"].write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, out["no_model"])
    out["a_file"].write_text("a file, not a folder")
    out["empty_dir"].mkdir()
    for name, sam, clip_id in (("vit_b_head", "vit_b", None), ("other_clip_head", "tiny", "0123456789abcdef")):
        head = load_head(out["head"])
        head.backbones = {"sam": sam, "clip": "clip_other", **({"clip_id": clip_id} if clip_id else {})}
        out[name] = save_head(head, root / f"{name}.pt")
    return out


def _predict_args(files: dict[str, Path], **changes: str | None) -> list[str]:
    """The flags of a good run (one box on the 80x60 image), with ``changes`` (None drops a flag)."""
    flags = {
        "--image": str(files["image"]), "--boxes": "5,5,40,30", "--vocab": VOCAB, "--head": str(files["head"]),
        "--sam_type": "tiny", "--sam_checkpoint": str(files["sam_checkpoint"]),
        "--clip_model": str(files["clip_dir"]), "--out": str(files["image"].parent / "out.png"),
        "--text_cache": str(files["text_cache"]),
    }  # fmt: skip
    flags.update({"--" + k: v for k, v in changes.items()})
    return [word for flag, value in flags.items() if value is not None for word in (flag, value)]


# (changes to a good run's flags, extra words, fragments the error line must hold); paths by key of `files`
PREDICT_CASES = {
    "missing image": ({"image": "@empty_dir/nope.jpg"}, [], ["image file not found", "nope.jpg"]),
    "corrupt image": ({"image": "@corrupt_image"}, [], ["corrupt.jpg could not be decoded"]),
    "box not 4 numbers": ({"boxes": "1,1,5"}, [], ["--boxes entry 0 '1,1,5' is not four numbers"]),
    "box outside the image": ({"boxes": "1,1,500,5"}, [], ["box 0", "outside the image of 80x60"]),
    "box corners swapped": ({"boxes": "40,5,5,30"}, [], ["is not x1,y1,x2,y2 with x2 > x1"]),
    "bad point label": ({"points": "10,20,5"}, [], ["--points region 0 point 0", "label must be 1"]),
    "empty vocabulary": ({"vocab": " , "}, [], ["vocabulary is empty"]),
    "repeated class": ({"vocab": "cat,cat"}, [], ["repeats class names ['cat']"]),
    "missing head": ({"head": "@empty_dir/head.pt"}, [], ["checkpoint not found", "head.pt"]),
    "corrupt head": ({"head": "@garbage"}, [], ["garbage.pt could not be read as a PyTorch checkpoint"]),
    "head for another CLIP": ({"head": "@wrong_head"}, [], ["bb.pt expects CLIP features of width 96"]),
    "head trained with another SAM": (
        {"head": "@vit_b_head"},
        [],
        ["vit_b_head.pt was trained on the pair SAM vit_b", "is given SAM tiny", "use a head trained on this pair"],
    ),
    "head trained with another CLIP of the same widths": (
        {"head": "@other_clip_head"},
        [],
        ["other_clip_head.pt", "(id 0123456789abcdef)", "clip_tiny (id "],
    ),
    "missing SAM checkpoint": ({"sam_checkpoint": "@empty_dir/sam.pth"}, [], ["SAM checkpoint", "sam.pth"]),
    "SAM checkpoint of no SAM": ({"sam_checkpoint": "@no_model"}, [], ["no_model.pth", "--sam_type tiny"]),
    "missing CLIP folder": ({"clip_model": "@empty_dir/clip"}, [], ["CLIP directory", "clip"]),
    "topk below 1": ({"topk": "0"}, [], ["--topk is 0", "must be >= 1"]),
    "unknown SAM type": (
        {"sam_type": "vit_x"},
        [],
        ["--sam_type is 'vit_x'", "vit_b, vit_l, vit_h, tiny, sam2.1_hiera_t", ".yaml"],
    ),
    "missing --head": ({"head": None}, [], ["--head is required"]),
    "no regions": ({"boxes": None}, [], ["give the regions: --boxes and/or --points"]),
    "unknown flag": ({}, ["--bogus", "1"], ["unrecognized arguments: --bogus"]),
    "not an integer": ({"topk": "three"}, [], ["--topk", "got three"]),
    "out in a file": ({"out": "@a_file/out.png"}, [], ["cannot write", "a_file"]),
    "everything without --json": ({"boxes": None}, ["--everything", "true"], ["--everything needs --json"]),
    "everything on no images": (
        {"image": None, "boxes": None, "out": None, "images": "@empty_dir", "json": "@empty_dir/o.json"},
        ["--everything", "true"],
        ["no images", "empty"],
    ),
    "everything threshold above 1": (
        {"boxes": None, "json": "x.json"},
        ["--everything", "true", "--generator.box_nms_thresh", "2"],
        ["--generator.box_nms_thresh is 2.0; it must be in [0, 1]"],
    ),
    "score threshold above 1": ({}, ["--score_thresh", "1.5"], ["--score_thresh is 1.5; it must be in [0, 1]"]),
    "switch without a value": ({}, ["--everything"], ["--everything: expected one argument"]),  # fmt: skip
    "missing config file": ({}, ["--config", "@empty_dir/nope.yaml"], ["config file not found", "nope.yaml"]),
}


def _resolve(files: dict[str, Path], value: str | None) -> str | None:
    """'@key/rest' -> files[key]/rest."""
    if value is None or not value.startswith("@"):
        return value
    key, _, rest = value[1:].partition("/")
    return str(files[key] / rest) if rest else str(files[key])


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_bad_input(files, cli_error, case):
    changes, extra, fragments = PREDICT_CASES[case]
    argv = _predict_args(files, **{k: _resolve(files, v) for k, v in changes.items()})
    cli_error(predict.main, argv + [_resolve(files, w) for w in extra], *fragments)


def test_predict_config_file_with_an_unknown_key(files, cli_error, tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("topk: 2\ntop_k: 3\n")
    cli_error(predict.main, _predict_args(files) + ["--config", config], "unknown key 'top_k' in", "predict.yaml")


CONVERT_CASES = {
    "missing checkpoint": (["@empty_dir/official.pth", "@empty_dir/out.pt"], ["checkpoint not found", "official.pth"]),
    "not a checkpoint": (["@garbage", "@empty_dir/out.pt"], ["garbage.pt could not be read"]),
    "no model dict": (["@no_model", "@empty_dir/out.pt"], ["no_model.pth: no 'model' dict"]),
    "no destination": (["@no_model"], ["arguments are required: dst"]),
    "too many words": (["@no_model", "a", "b"], ["unrecognized arguments: b"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_bad_input(files, cli_error, case):
    argv, fragments = CONVERT_CASES[case]
    cli_error(convert.main, [_resolve(files, w) for w in argv], *fragments)
