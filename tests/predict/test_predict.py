"""Predictor, its CLI and the pictures: scores equal the cached batch path, errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import probability_rtol

from regionspot_pl.backbones.clip import ClipEncoder, text_embeddings
from regionspot_pl.backbones.sam_segmenter import SamSegmenter
from regionspot_pl.cache.manifest import Manifest
from regionspot_pl.cache.shards import iter_samples, list_shards
from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.extract.run import ExtractConfig, run_extraction
from regionspot_pl.model import RegionSpotHead, region_logits, save_head
from regionspot_pl.model.head import HeadMismatchError
from regionspot_pl.predict import viz
from regionspot_pl.predict.cli import main
from regionspot_pl.predict.predictor import Predictor

NUM_IMAGES = 3


@pytest.fixture(scope="module")
def setup(tiny_backbones, tmp_path_factory) -> dict:
    """Demo val images, a random head that fits the tiny backbones, and their cached features."""
    root = tmp_path_factory.mktemp("predict")
    demo = generate_demo_dataset(root / "demo", num_train=2, num_val=14, seed=0)
    torch.manual_seed(0)
    head = RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=256, num_heads=4)
    head_path = save_head(head, root / "head.pt")
    text_cache = root / "text_embeddings.h5"
    cfg = ExtractConfig(
        images=str(demo["val_images"]), annotations=str(demo["val_json"]), out=str(root / "shards"),
        sam_type="tiny", sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
        clip_model=str(tiny_backbones["clip_dir"]), workers=0, batch_size=1, limit=NUM_IMAGES,
        text_cache=str(text_cache),
    )  # fmt: skip
    # One image a batch, as the predictor encodes: both take the same float path, so their scores
    # agree to the last bits. (Batched extraction stores the same tokens up to one float16 step,
    # tests/backbones/test_backbones.py; one such step in every stored value, put through the head and
    # CLIP's logit scale of 100, moved these probabilities by up to 2e-4.)
    run_extraction(cfg)
    predictor = Predictor.from_pretrained(
        head=head_path, sam_type="tiny", sam_checkpoint=tiny_backbones["sam_checkpoint"],
        clip_model=tiny_backbones["clip_dir"], text_cache=text_cache,
    )  # fmt: skip
    manifest = Manifest.read(root / "shards")
    return {
        "root": root,
        "demo": demo,
        "head": head_path,
        "text_cache": text_cache,
        "shards": list_shards(root / "shards"),
        "names": list(manifest.vocabulary.names),
        "clip_id": manifest.clip.id,
        "predictor": predictor,
        "backbones": tiny_backbones,
    }


def _image_path(setup: dict, sample: dict) -> Path:
    return Path(setup["demo"]["val_images"]) / sample["meta"]["file_name"]


def test_scores_equal_cached_batch_path(setup):
    predictor: Predictor = setup["predictor"]
    names = setup["names"]
    texts = text_embeddings(predictor.encoder.vlm, names, setup["text_cache"], setup["clip_id"])
    samples = list(iter_samples(setup["shards"]))
    assert len(samples) == NUM_IMAGES
    for sample in samples:
        with torch.no_grad():  # the batch path: head on the float16 cache read back as float32
            regions = predictor.head(
                torch.from_numpy(sample["sam"].astype(np.float32))[None],
                torch.tensor(sample["clip"])[None],  # a copy: the cache's view is read-only
            )[0]
        expected = region_logits(regions, texts).softmax(-1).numpy()

        predictor.set_image(_image_path(setup, sample))
        results = predictor.predict(sample["boxes"], names, topk=len(names))
        assert len(results) == len(sample["boxes"])
        got = np.zeros_like(expected)
        for i, r in enumerate(results):
            assert r["scores"] == sorted(r["scores"], reverse=True)
            for label, score in zip(r["labels"], r["scores"]):
                got[i, names.index(label)] = score
            assert r["mask"].dtype == bool and r["mask"].shape == predictor.image_size
            np.testing.assert_allclose(r["box"], sample["boxes"][i], rtol=0, atol=1e-4)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_image_features_computed_once(setup, monkeypatch):
    predictor: Predictor = setup["predictor"]
    calls = {"sam": 0, "clip": 0}
    encode_images, feature_map = SamSegmenter.encode_images, ClipEncoder.feature_map

    def counting_sam(self, batch):
        calls["sam"] += 1
        return encode_images(self, batch)

    def counting_clip(self, pixels):
        calls["clip"] += 1
        return feature_map(self, pixels)

    monkeypatch.setattr(SamSegmenter, "encode_images", counting_sam)
    monkeypatch.setattr(ClipEncoder, "feature_map", counting_clip)
    sample = next(iter(iter_samples(setup["shards"])))
    predictor.set_image(Image.open(_image_path(setup, sample)))
    first = predictor.predict(sample["boxes"], setup["names"], topk=3)
    second = predictor.predict(sample["boxes"], setup["names"], topk=3)
    assert calls == {"sam": 1, "clip": 1}
    assert first[0]["scores"] == second[0]["scores"]
    assert len(first[0]["labels"]) == 3


def test_attention_maps(setup):
    predictor: Predictor = setup["predictor"]
    sample = next(iter(iter_samples(setup["shards"])))
    predictor.set_image(np.array(Image.open(_image_path(setup, sample)).convert("RGB")))
    maps = predictor.attention_maps(sample["boxes"])
    n, t = len(sample["boxes"]), predictor.encoder.vlm.num_tokens
    assert maps.shape == (n, t) and t == 1 + predictor.clip_grid**2
    torch.testing.assert_close(maps.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
    assert (maps >= 0).all()
    results = predictor.predict(sample["boxes"], setup["names"], return_attention=True)
    np.testing.assert_allclose(np.stack([r["attention"] for r in results]), maps.numpy(), atol=1e-6)
    # the hook is removed afterwards: the head's last layer carries no leftover hook
    assert not predictor.head.decoder.layers[-1].multihead_attn._forward_hooks


def test_error_messages(setup, tmp_path):
    predictor: Predictor = setup["predictor"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg could not be decoded"):
        predictor.set_image(bad)
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        predictor.set_image(tmp_path / "missing.png")

    sample = next(iter(iter_samples(setup["shards"])))
    predictor.set_image(_image_path(setup, sample))
    h, w = predictor.image_size
    with pytest.raises(ValueError, match=rf"box 1 \[10, 10, {w + 20}, 50\] is outside the image of {w}x{h}"):
        predictor.predict([[0, 0, 20, 20], [10, 10, w + 20, 50]], setup["names"])
    with pytest.raises(ValueError, match=r"box 0 \[50, 10, 20, 40\] is not x1,y1,x2,y2 with x2 > x1"):
        predictor.predict([[50, 10, 20, 40]], setup["names"])
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        predictor.predict([[1, 2, 3]], setup["names"])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        predictor.predict([[0, 0, 20, 20]], [])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        predictor.predict([[0, 0, 20, 20]], empty)


def test_vocabulary_file(setup):
    predictor: Predictor = setup["predictor"]
    sample = next(iter(iter_samples(setup["shards"])))
    predictor.set_image(_image_path(setup, sample))
    from_file = predictor.predict(sample["boxes"][:2], setup["demo"]["vocabulary"], topk=2)
    from_list = predictor.predict(sample["boxes"][:2], setup["names"], topk=2)
    assert [r["labels"] for r in from_file] == [r["labels"] for r in from_list]


def test_head_clip_dim_mismatch(setup, tmp_path):
    wrong = save_head(RegionSpotHead(clip_dim=96, text_dim=64, ffn_dim=256, num_heads=4), tmp_path / "h.pt")
    with pytest.raises(
        HeadMismatchError, match=r"h.pt expects CLIP features of width 96 and text dim 64.*gives width 128"
    ):
        Predictor.from_pretrained(
            head=wrong, sam_type="tiny", sam_checkpoint=setup["backbones"]["sam_checkpoint"],
            clip_model=setup["backbones"]["clip_dir"],
        )  # fmt: skip


def _cli_args(setup: dict, image: Path, boxes: str, out: Path, vocab: str | None = None) -> list[str]:
    return [
        "--image", str(image), "--boxes", boxes, "--vocab", vocab or ",".join(setup["names"][:6]),
        "--head", str(setup["head"]), "--sam_type", "tiny",
        "--sam_checkpoint", str(setup["backbones"]["sam_checkpoint"]),
        "--clip_model", str(setup["backbones"]["clip_dir"]), "--out", str(out), "--topk", "2",
        "--text_cache", str(setup["text_cache"]),
    ]  # fmt: skip


def test_cli_end_to_end(setup, tmp_path, capsys):
    sample = next(iter(iter_samples(setup["shards"])))
    boxes = ";".join(",".join(f"{v:.1f}" for v in b) for b in sample["boxes"][:3])
    out = tmp_path / "pred.png"
    attention = tmp_path / "attn.png"
    args = _cli_args(setup, _image_path(setup, sample), boxes, out) + [
        "--attention_out",
        str(attention),
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 3
    assert set(printed[0]) == {"box", "labels", "scores", "iou"} and len(printed[0]["labels"]) == 2
    assert printed[0]["labels"][0] in setup["names"][:6]
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) >= 256
    assert attention.is_file()


def test_cli_bad_input(setup, tmp_path, capsys):
    sample = next(iter(iter_samples(setup["shards"])))
    image = _image_path(setup, sample)
    out = tmp_path / "x.png"
    cases = [
        (_cli_args(setup, tmp_path / "nope.jpg", "1,1,5,5", out), "image file not found"),
        (_cli_args(setup, image, "1,1,5", out), "--boxes entry 0 '1,1,5' is not four numbers"),
        (_cli_args(setup, image, "1,1,5000,5", out), "outside the image"),
        (_cli_args(setup, image, "1,1,5,5", out, vocab=" , "), "vocabulary is empty"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_viz_pictures(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = [[5, 5, 60, 50], [70, 30, 150, 110]]
    masks = np.zeros((2, 120, 160), dtype=bool)
    masks[0, 10:40, 10:50] = True
    pic = viz.draw_detections(image, boxes, ["cat", "dog"], [0.9, 0.4], masks=masks, gt_labels=["cat", "cow"])
    assert pic.size == (640, 480)  # enlarged x4 so that captions stay readable
    attn = np.full(1 + 14 * 14, 1 / 197)
    attn[1 + 3 * 14 + 5] += 0.1
    heat = viz.draw_attention(image, boxes[0], attn / attn.sum(), grid=14, title="cat")
    assert heat.width == 640 and heat.height > 480  # caption band below
    shared = viz.draw_attention(image, boxes[0], attn / attn.sum(), grid=14, title="cat", value_range=(0, 0.2))
    assert shared.size == heat.size
    path = viz.save_grid([pic, heat, shared], tmp_path / "grid.png", cols=2)
    with Image.open(path) as im:
        assert im.width > 1280
    with pytest.raises(ValueError, match="expected 1 class token"):
        viz.draw_attention(image, boxes[0], attn[:-1], grid=14)


def test_scores_equal_the_test_cli_batch_path(setup):
    """The same numbers as `python -m regionspot_pl.test` computes: its batched head pass over the shards."""
    from regionspot_pl.evaluation.zero_shot import regionspot_logits
    from regionspot_pl.model import load_head

    texts = text_embeddings(None, setup["names"], setup["text_cache"], setup["clip_id"])
    shards = [str(p) for p in setup["shards"]]
    batch = {b.image_id: b for b in regionspot_logits(load_head(setup["head"]), shards, texts, torch.device("cpu"), 2)}
    predictor = setup["predictor"]
    for sample in iter_samples(shards):
        predictor.set_image(_image_path(setup, sample))
        preds = predictor.predict(sample["boxes"], setup["names"], topk=len(setup["names"]))
        expected = batch[int(sample["meta"]["image_id"])].logits.softmax(-1)
        for n, p in enumerate(preds):
            got = torch.tensor([p["scores"][p["labels"].index(c)] for c in setup["names"]])
            # the test CLI's head runs on two padded images at once, the predictor's on one: the
            # same sums in another order, the longest 256 long (the SAM token's projection)
            torch.testing.assert_close(got, expected[n], rtol=probability_rtol(256), atol=1e-7)
