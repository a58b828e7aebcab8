"""Every frozen pair end to end: extract -> fit -> test -> predict (boxes and everything), through the
commands as a user runs them, on the tiny random model of each family (``python -m regionspot_pl.tiny``).
A head trained on one pair is refused on another, naming both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_fit import tiny_fit_config

from regionspot_pl import Predictor
from regionspot_pl import test as test_cli
from regionspot_pl.backbones.clip import model_identity
from regionspot_pl.backbones.tiny import tiny_pair
from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.extract.run import ExtractConfig, run_extraction
from regionspot_pl.fit import run as fit_run
from regionspot_pl.model.head import HeadMismatchError
from regionspot_pl.predict import cli as predict_cli

# every family at least once beside another family (SAM + CLIP is every other test's pair)
PAIRS = [("sam2.1", "siglip"), ("sam", "metaclip2"), ("sam", "siglip")]


def _pair_flags(tiny: dict, sam: str, vlm: str) -> dict[str, str]:
    return tiny_pair(Path(tiny["clip_dir"]).parent, sam, vlm)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    return generate_demo_dataset(tmp_path_factory.mktemp("pair_scenes"), num_train=4, num_val=14, image_size=64, seed=0)


def _extract(scenes: dict, flags: dict, split: str, root: Path) -> Path:
    run_extraction(
        ExtractConfig(
            images=str(scenes[f"{split}_images"]), annotations=str(scenes[f"{split}_json"]), out=str(root / split),
            dataset=f"demo_{split}", shard_size=4, workers=0, text_cache=str(root / "text.h5"), **flags,
        )
    )  # fmt: skip
    return root / split


@pytest.mark.slow
@pytest.mark.parametrize(("sam", "vlm"), PAIRS, ids=[f"{s}+{v}" for s, v in PAIRS])
def test_every_stage_runs_on_the_pair(sam, vlm, scenes, tiny_backbones, tmp_path, capsys):
    flags = _pair_flags(tiny_backbones, sam, vlm)
    train, val = (_extract(scenes, flags, split, tmp_path) for split in ("train", "val"))
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["backbones"]["clip"]["model"] == flags["clip_model"]

    fit_run(tiny_fit_config(train, tmp_path / "run", 2, data={"val_shards": str(val),
                                                              "val_annotations": str(scenes["val_json"])}))  # fmt: skip
    head = tmp_path / "run" / "head"
    recorded = json.loads((head / "config.json").read_text())["backbones"]
    assert recorded["clip_id"] == manifest["backbones"]["clip"]["id"]

    argv = ["--shards", val, "--annotations", scenes["val_json"], "--head", head, "--out", tmp_path / "test"]
    assert test_cli.main([str(a) for a in [*argv, "--device", "cpu", "--text_cache", tmp_path / "text.h5"]]) == 0
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert 0 <= metrics["bbox"]["AP"] <= 1

    image = Path(scenes["val_images"]) / json.loads(Path(scenes["val_json"]).read_text())["images"][0]["file_name"]
    predictor = Predictor.from_pretrained(head=head, text_cache=tmp_path / "text.h5", **flags)
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    (region,) = predictor.predict([[10, 10, 60, 50]], ["red circle", "blue square", "green star"], topk=3)
    assert sorted(region["labels"]) == ["blue square", "green star", "red circle"]
    assert abs(sum(region["scores"]) - 1) < 1e-5  # probabilities over the whole (3-name) vocabulary

    # the head is refused on the default pair (tiny SAM + tiny CLIP), the error naming both pairs
    with pytest.raises(HeadMismatchError, match="trained on the pair SAM") as refused:
        Predictor.from_pretrained(head=head, **_pair_flags(tiny_backbones, "sam", "clip"))
    given = Path(tiny_backbones["clip_dir"])
    assert recorded["clip_id"] in str(refused.value) and f"{given} (id {model_identity(given)})" in str(refused.value)

    pair = [w for k, v in flags.items() for w in (f"--{k}", v)]
    everything = ["--everything", "true", "--image", str(image), "--json", str(tmp_path / "all.json")]
    loose = [
        "--generator.points_per_side",
        "4",
        "--generator.pred_iou_thresh",
        "0",
        "--generator.stability_score_thresh",
        "0",
    ]
    common = ["--head", str(head), "--vocab", "red circle,blue square", "--text_cache", str(tmp_path / "text.h5")]
    assert predict_cli.main([*common, *pair, *everything, *loose, "--out", str(tmp_path / "all.png")]) == 0
    named = json.loads((tmp_path / "all.json").read_text())["annotations"]
    assert named and {a["category_name"] for a in named} <= {"red circle", "blue square"}
    capsys.readouterr()
