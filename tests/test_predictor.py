"""The predictor: same scores as the batch `test` path, features once per image, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from regionspot_pl import RegionSpotHead, save_head
from regionspot_pl.backbones.clip import ClipEncoder, text_embeddings
from regionspot_pl.backbones.sam import SamRegionEncoder
from regionspot_pl.data.shards import iter_samples, list_shards, read_manifest
from regionspot_pl.predict import Predictor, main
from regionspot_pl.test import regionspot_logits


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    head = RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4).eval()
    return save_head(head, tmp_path_factory.mktemp("head") / "head.pt")


@pytest.fixture(scope="module")
def predictor(head_file, tiny_backbones, demo_shards):
    return Predictor.from_pretrained(head=head_file, sam_type="tiny", sam_checkpoint=tiny_backbones["sam_checkpoint"],
                                     clip_model=tiny_backbones["clip_dir"], text_cache=demo_shards["text_cache"])


def test_predictor_scores_equal_the_batch_test_path(predictor, head_file, demo_shards, demo_data):
    from regionspot_pl import load_head

    manifest = read_manifest(demo_shards["val"])
    names = manifest["vocabulary"]["names"]
    texts = text_embeddings(None, names, demo_shards["text_cache"], manifest["backbones"]["clip"]["id"])
    shards = [str(p) for p in list_shards(demo_shards["val"])]
    batch = {b.image_id: b for b in regionspot_logits(load_head(head_file), shards, texts, torch.device("cpu"), 4)}
    for sample in list(iter_samples(shards))[:2]:
        image_id = int(sample["meta"]["image_id"])
        predictor.set_image(demo_data["val_images"] / sample["meta"]["file_name"])
        preds = predictor.predict(sample["boxes"], names, topk=len(names))
        expected = batch[image_id].logits.softmax(-1)
        for n, p in enumerate(preds):
            got = torch.tensor([p["scores"][p["labels"].index(c)] for c in names])
            torch.testing.assert_close(got, expected[n], rtol=1e-4, atol=1e-5)
            assert p["mask"].shape == (sample["meta"]["height"], sample["meta"]["width"])
            assert p["scores"] == sorted(p["scores"], reverse=True)


def test_image_features_are_computed_once_per_image(predictor, demo_data, monkeypatch):
    calls = {"sam": 0, "clip": 0}
    sam_encode, clip_map = SamRegionEncoder.encode_images, ClipEncoder.feature_map

    def count_sam(self, *a, **k):
        calls["sam"] += 1
        return sam_encode(self, *a, **k)

    def count_clip(self, *a, **k):
        calls["clip"] += 1
        return clip_map(self, *a, **k)

    monkeypatch.setattr(SamRegionEncoder, "encode_images", count_sam)
    monkeypatch.setattr(ClipEncoder, "feature_map", count_clip)
    image = sorted(demo_data["val_images"].glob("*.jpg"))[0]
    predictor.set_image(image)
    predictor.predict([[10, 10, 80, 90]], ["a", "b"])
    predictor.predict([[20, 30, 120, 100], [0, 0, 50, 50]], ["a", "b", "c"], topk=2)
    assert calls == {"sam": 1, "clip": 1}


def test_attention_maps_are_distributions_over_clip_tokens(predictor, demo_data):
    predictor.set_image(sorted(demo_data["val_images"].glob("*.jpg"))[0])
    maps = predictor.attention_maps([[10, 10, 80, 90], [100, 100, 200, 220]])
    assert maps.shape == (2, 197)
    torch.testing.assert_close(maps.sum(1), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_bad_input_gets_a_clear_error(predictor, demo_data, tmp_path, head_file, tiny_backbones):
    image = sorted(demo_data["val_images"].glob("*.jpg"))[0]
    predictor.set_image(image)
    w, h = Image.open(image).size
    with pytest.raises(ValueError, match=f"outside the image of {w}x{h}"):
        predictor.predict([[0, 0, w + 50, 10]], ["a"])
    with pytest.raises(ValueError, match="x2 > x1"):
        predictor.predict([[50, 10, 20, 40]], ["a"])
    with pytest.raises(ValueError, match="empty"):
        predictor.predict([[0, 0, 10, 10]], [])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not be read"):
        predictor.set_image(broken)
    with pytest.raises(FileNotFoundError, match="not found"):
        predictor.set_image(tmp_path / "missing.jpg")
    other = save_head(RegionSpotHead(clip_dim=256, text_dim=64, ffn_dim=64, num_heads=4), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        Predictor.from_pretrained(head=other, sam_type="tiny", sam_checkpoint=tiny_backbones["sam_checkpoint"],
                                  clip_model=tiny_backbones["clip_dir"])


def test_cli_writes_a_picture_and_prints_json(head_file, tiny_backbones, demo_data, demo_shards, tmp_path, capsys):
    image = sorted(demo_data["val_images"].glob("*.jpg"))[0]
    out = tmp_path / "pred.png"
    args = ["--image", str(image), "--boxes", "10,10,80,90;100,100,200,220", "--vocab", "red solid circle,blue dotted arrow",
            "--head", str(head_file), "--sam-type", "tiny", "--sam-checkpoint", str(tiny_backbones["sam_checkpoint"]),
            "--clip-model", str(tiny_backbones["clip_dir"]), "--out", str(out), "--topk", "2",
            "--text-cache", str(tmp_path / "text.h5")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 2 and len(printed[0]["labels"]) == 2 and printed[0]["box"] == [10, 10, 80, 90]
    assert np.isclose(sum(printed[0]["scores"]), 1.0, atol=1e-5)  # two classes: probabilities sum to 1
    assert Image.open(out).size[0] >= 256
    bad = list(args)
    bad[bad.index("--boxes") + 1] = "10,10,5,5"
    assert main(bad) == 2
    assert "x2 > x1" in capsys.readouterr().err
