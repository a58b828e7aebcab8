"""Offline extraction: equivalence with SAM's and CLIP's own code, shard format, crash safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from tolerances import assert_close_across_batching, assert_masks_agree
from torchvision.transforms import functional as TF
from transformers import CLIPVisionModel

from regionspot_pl.backbones.clip import CLIP_MEAN, CLIP_STD
from regionspot_pl.backbones.sam import build_sam
from regionspot_pl.cache.manifest import PROTOCOL, Manifest
from regionspot_pl.cache.shards import (
    ShardFormatError,
    decode_sample,
    encode_sample,
    iter_samples,
    list_shards,
    validate_sample,
)
from regionspot_pl.data.annotations import AnnotationError
from regionspot_pl.data.records import load_coco
from regionspot_pl.extract.cli import COMMAND, main
from regionspot_pl.extract.run import (
    ExtractConfig,
    ExtractError,
    FeatureExtractor,
    ImageFeaturesInput,
    load_extractor,
    run_extraction,
)


def _config(demo_data, tiny_backbones, out, split="train", **kw) -> ExtractConfig:
    return ExtractConfig(
        images=str(demo_data[f"{split}_images"]),
        annotations=str(demo_data[f"{split}_json"]),
        out=str(out),
        sam_type="tiny",
        sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
        clip_model=str(tiny_backbones["clip_dir"]),
        dataset=f"demo_{split}",
        workers=0,
        text_cache=str(Path(out).parent / "text.h5"),
        **kw,
    )


def _samples(folder) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(list_shards(folder))}


def _same(a: dict, b: dict) -> bool:
    return (
        all(np.array_equal(a[k], b[k]) for k in ("sam", "boxes", "labels", "scores", "clip")) and a["meta"] == b["meta"]
    )


def _reference_resize(image: np.ndarray) -> np.ndarray:
    """detectron2's ResizeShortestEdge(800, 1333) written out independently: PIL bilinear."""
    h, w = image.shape[:2]
    scale = 800 / min(h, w)
    newh, neww = (800, scale * w) if h < w else (scale * h, 800)
    if max(newh, neww) > 1333:
        newh, neww = newh * 1333 / max(newh, neww), neww * 1333 / max(newh, neww)
    size = (int(neww + 0.5), int(newh + 0.5))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def test_shards_hold_what_sam_predictor_and_hf_clip_give(demo_shards, demo_data, tiny_backbones):
    """The reference's path, rebuilt from the libraries: SamPredictor on the detectron2-resized
    image (boxes scaled into it, masks nearest-upsampled back), HF CLIP on torchvision's
    non-antialiased square resize of that image."""
    samples = _samples(demo_shards["val"])
    records, vocab, _ = load_coco(demo_data["val_json"])
    assert len(samples) == len(records) == 14
    rec = max(records, key=lambda r: len(r.boxes))  # the image with the most boxes
    s = samples[str(rec.image_id)]
    assert s["sam"].shape == (len(rec.boxes), 256) and s["sam"].dtype == np.float16
    np.testing.assert_array_equal(s["boxes"], rec.boxes)  # boxes stay in original pixels
    np.testing.assert_array_equal(s["labels"], rec.labels)
    assert s["meta"]["dataset"] == "demo_val" and s["meta"]["width"] == rec.width

    image = np.array(Image.open(demo_data["val_images"] / rec.file_name).convert("RGB"))
    resized = _reference_resize(image)
    assert resized.shape[:2] != image.shape[:2]  # the demo's images are smaller than 800
    sam = build_sam("tiny", tiny_backbones["sam_checkpoint"])
    predictor = SamPredictor(sam)
    seen = {}
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, a, o: seen.update(hs=o[0]))
    predictor.set_image(resized)
    (h, w), (rh, rw) = image.shape[:2], resized.shape[:2]
    scaled = torch.from_numpy(rec.boxes).double() * torch.tensor([rw / w, rh / h, rw / w, rh / h]).double()
    boxes = predictor.transform.apply_boxes_torch(scaled.float(), resized.shape[:2])
    masks, iou_predictions, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    hook.remove()
    expected_tokens = seen["hs"][:, 1].numpy()  # first mask token; index 0 is the IoU token
    np.testing.assert_allclose(s["sam"].astype(np.float32), expected_tokens, rtol=2e-3, atol=2e-3)
    # the predicted IoU of the same (single) mask, float32 as stored; the IoU head's widest
    # reduction is the decoder's MLP (2048)
    assert s["iou"].dtype == np.float32 and s["iou"].shape == (len(rec.boxes),)
    assert_close_across_batching(torch.from_numpy(s["iou"]), iou_predictions[:, 0], reduction_length=2048)
    expected_masks = torch.nn.functional.interpolate(masks.float(), size=(h, w), mode="nearest")[:, 0] > 0
    stored = mask_utils.decode(s["meta"]["masks"]).transpose(2, 0, 1).astype(bool)
    # the shards decode the boxes of a batch of images together, SamPredictor one image's boxes
    assert_masks_agree(torch.from_numpy(stored), expected_masks)
    assert expected_masks.any()  # not vacuous

    vision = CLIPVisionModel.from_pretrained(tiny_backbones["clip_dir"], local_files_only=True).eval()
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    square = TF.resize(
        torch.from_numpy(resized).permute(2, 0, 1).float() / 255,
        [224, 224],
        interpolation=TF.InterpolationMode.BILINEAR,
        antialias=False,
    )
    with torch.no_grad():
        expected_clip = vision(pixel_values=((square - mean) / std)[None]).last_hidden_state[0].numpy()
    assert s["clip"].shape == (197, 128) and s["clip"].dtype == np.float16
    np.testing.assert_allclose(s["clip"].astype(np.float32), expected_clip, rtol=2e-3, atol=2e-3)

    manifest = Manifest.read(demo_shards["val"])
    assert manifest.protocol == PROTOCOL
    assert list(manifest.vocabulary.names) == list(vocab.names)
    assert manifest.sam.type == "tiny" and len(manifest.sam.sha256_16) == 16
    assert manifest.counts["samples"] == 14 and manifest.config["shard_size"] == 4


def test_compiled_extractor_gives_the_eager_results(demo_shards, demo_data, tiny_backbones, tmp_path):
    """--compile (torch.compile of SAM's decoder and both encoders) changes speed, not results:
    the same tokens up to float rounding and the same masks but for pixels at the threshold."""
    cfg = _config(demo_data, tiny_backbones, tmp_path / "c", split="val", compile=True, precision="fp32")
    extractor = load_extractor(cfg)
    assert hasattr(extractor.encoder.segmenter.sam.mask_decoder, "_orig_mod")  # torch.compile's wrapper
    records, _, _ = load_coco(demo_data["val_json"])
    records = sorted(records, key=lambda r: -len(r.boxes))[:3]  # different box counts: dynamic shapes
    dataset = ImageFeaturesInput([(0, r) for r in records], cfg.images, extractor.encoder.segmenter.transform)
    compiled = [decode_sample(s) for s in extractor([dataset[i] for i in range(len(records))], "demo_val")]
    eager = _samples(demo_shards["val"])
    assert len({len(r.boxes) for r in records}) > 1
    for s in compiled:
        e = eager[s["__key__"]]
        np.testing.assert_allclose(s["sam"].astype(np.float32), e["sam"].astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(s["clip"].astype(np.float32), e["clip"].astype(np.float32), rtol=2e-3, atol=2e-3)
        ours, theirs = (mask_utils.decode(x["meta"]["masks"]).astype(bool) for x in (s, e))
        assert (ours == theirs).mean() > 0.9999


def test_shards_are_plain_webdataset_tars(demo_shards):
    shards = list_shards(demo_shards["train"])
    raw = next(iter(wds.WebDataset([str(shards[0])], shardshuffle=False)))
    assert {"sam.npy", "boxes.npy", "labels.npy", "scores.npy", "iou.npy", "clip.npy", "json"} <= set(raw)
    arr = wds.autodecode.npy_loads(raw["sam.npy"])  # readable by webdataset's own decoder
    assert arr.dtype == np.float16 and arr.shape[1] == 256
    total = sum(json.loads(p.with_suffix(".json").read_text())["samples"] for p in shards)
    assert total == 24 and len(shards) == 6


def test_sample_round_trip_and_validation():
    rng = np.random.default_rng(0)
    arrays = dict(
        sam=rng.normal(size=(3, 256)),
        boxes=rng.uniform(0, 9, size=(3, 4)),
        labels=np.array([0, 2, -1]),
        scores=np.ones(3),
        iou=np.array([0.93, 1.04, -0.02]),
        clip=rng.normal(size=(5, 8)),
    )
    sample = encode_sample(7, **arrays, meta={"file_name": "a.jpg", "width": 10, "height": 10})
    back = validate_sample(decode_sample(sample))
    assert back["__key__"] == "7" and back["meta"]["image_id"] == 7
    np.testing.assert_array_equal(back["labels"], arrays["labels"])
    np.testing.assert_array_equal(back["sam"], arrays["sam"].astype(np.float16))
    with pytest.raises(ShardFormatError, match="per-box arrays disagree"):
        encode_sample(7, **{**arrays, "labels": np.array([0, 1])}, meta={})
    pickled = dict(sample)
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled["labels.npy"] = buf.getvalue()
    with pytest.raises(ShardFormatError, match="not a plain .npy"):
        decode_sample(pickled)  # object arrays (pickle) are refused, never loaded


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(demo_data, tiny_backbones, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_extraction(_config(demo_data, tiny_backbones, straight, shard_size=3, batch_size=2, limit=12))

    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    original = FeatureExtractor.encode

    def dies_on_fourth_batch(self, items):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return original(self, items)

    monkeypatch.setattr(FeatureExtractor, "encode", dies_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(_config(demo_data, tiny_backbones, crashed, shard_size=3, batch_size=2, limit=12))
    partial = sorted(p.name for p in crashed.glob("*.tar"))
    assert 0 < len(partial) < 4  # some shards finished, the rest did not
    monkeypatch.setattr(FeatureExtractor, "encode", original)
    summary = run_extraction(_config(demo_data, tiny_backbones, crashed, shard_size=3, batch_size=2, limit=12))
    assert summary["resumed_images"] == 3 * len(partial)
    assert summary["images"] == 12 - 3 * len(partial)
    assert not list(crashed.glob("*.tmp"))
    for a in sorted(straight.glob("*.tar")):  # byte-identical shards, no duplicates
        assert (crashed / a.name).read_bytes() == a.read_bytes()
    assert sorted(p.name for p in crashed.glob("*.tar")) == sorted(p.name for p in straight.glob("*.tar"))
    # a third run has nothing left to do
    assert (
        run_extraction(_config(demo_data, tiny_backbones, crashed, shard_size=3, batch_size=2, limit=12))["images"] == 0
    )


def test_resuming_into_a_folder_of_another_extraction_is_refused(demo_data, tiny_backbones, tmp_path):
    out = tmp_path / "out"
    run_extraction(_config(demo_data, tiny_backbones, out, split="val", shard_size=7))
    with pytest.raises(ExtractError, match="differs in: shard_size"):
        run_extraction(_config(demo_data, tiny_backbones, out, split="val", shard_size=5))
    # same path, edited content: resuming would silently mix two datasets
    edited = tmp_path / "val.json"
    coco = json.loads(Path(demo_data["val_json"]).read_text())
    coco["annotations"] = coco["annotations"][1:]
    edited.write_text(json.dumps(coco))
    cfg = _config(demo_data, tiny_backbones, out, split="val", shard_size=7)
    cfg.annotations = str(edited)
    first = json.loads((out / "manifest.json").read_text())
    first["config"]["annotations"] = str(edited)  # as if the file had been edited in place
    (out / "manifest.json").write_text(json.dumps(first))
    with pytest.raises(ExtractError, match="annotation file content"):
        run_extraction(cfg)


def test_two_ranks_together_equal_one(demo_shards, demo_data, tiny_backbones, tmp_path):
    single = _samples(demo_shards["train"])
    single = {k: single[k] for k in sorted(single, key=int)[:10]}  # the first 10 images by id
    out = tmp_path / "ranks"
    for rank in (0, 1):
        run_extraction(_config(demo_data, tiny_backbones, out, shard_size=4, rank=rank, world_size=2, limit=10))
    both = _samples(out)
    assert sorted(both) == sorted(single)
    assert all(_same(both[k], single[k]) for k in single)
    names = {p.name.split("-")[1] for p in out.glob("*.tar")}
    assert names == {"r000", "r001"}


def _argv(demo_data, tiny_backbones, out, *extra) -> list[str]:
    return [
        f"--images={demo_data['val_images']}",
        f"--annotations={demo_data['val_json']}",
        f"--out={out}",
        "--sam_type=tiny",
        f"--sam_checkpoint={tiny_backbones['sam_checkpoint']}",
        f"--clip_model={tiny_backbones['clip_dir']}",
        *extra,
    ]


def test_torchrun_environment_sets_rank(monkeypatch, demo_data, tiny_backbones, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = COMMAND.parse(_argv(demo_data, tiny_backbones, tmp_path))
    assert (cfg.rank, cfg.world_size) == (1, 3)
    cfg = COMMAND.parse(_argv(demo_data, tiny_backbones, tmp_path, "--rank=2"))
    assert cfg.rank == 2  # a flag overrides the environment
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = COMMAND.parse(_argv(demo_data, tiny_backbones, tmp_path, "--device=cuda"))
    assert cfg.device == "cuda:1"  # each torchrun process on its own GPU


def _broken_dataset(demo_data, tmp_path) -> tuple[Path, Path]:
    """val set copy with a corrupt JPEG, a missing image, and boxes to clip, drop and skip."""
    images = tmp_path / "images"
    shutil.copytree(demo_data["val_images"], images)
    coco = json.loads(Path(demo_data["val_json"]).read_text())
    first, second = coco["images"][0], coco["images"][1]
    (images / first["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (images / second["file_name"]).unlink()
    third = coco["images"][2]
    next_id = max(a["id"] for a in coco["annotations"]) + 1
    coco["annotations"] += [
        {"id": next_id, "image_id": third["id"], "category_id": 1, "bbox": [10, 10, 0, 20], "area": 0, "iscrowd": 0},
        {
            "id": next_id + 1,
            "image_id": third["id"],
            "category_id": 1,
            "bbox": [-20, 5, 60, 30],
            "area": 1,
            "iscrowd": 0,
        },
        {"id": next_id + 2, "image_id": third["id"], "category_id": 1, "bbox": [5, 5, 30, 30], "area": 1, "iscrowd": 1},
    ]
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps(coco))
    return images, ann


def test_corrupt_images_and_bad_boxes_are_skipped_and_counted(demo_data, tiny_backbones, tmp_path, caplog):
    images, ann = _broken_dataset(demo_data, tmp_path)
    records, _, stats = load_coco(ann)
    assert (stats.degenerate_dropped, stats.crowd_skipped, stats.clipped) == (1, 1, 1)
    third = records[2]
    assert third.boxes[:, 0].min() == 0  # the box starting at x=-20 was clipped to the image
    cfg = _config(demo_data, tiny_backbones, tmp_path / "out", split="val", shard_size=4)
    cfg.images, cfg.annotations = str(images), str(ann)
    summary = run_extraction(cfg)
    assert summary["images"] == 12 and summary["skipped"] == 2
    assert summary["skipped_by_reason"] == {"missing": 1, "undecodable": 1}
    assert "skipping unreadable image" in caplog.text
    side = json.loads((tmp_path / "out" / "demo_val-r000-000000.json").read_text())
    assert sorted(s["reason"] for s in side["skipped"]) == ["missing", "undecodable"]
    assert any("not found" in s["error"] for s in side["skipped"])
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.annotations["degenerate_dropped"] == 1 and manifest.counts["skipped"] == 2
    assert manifest.counts["skipped_by_reason"] == {"missing": 1, "undecodable": 1}
    keys = _samples(tmp_path / "out")
    assert len(keys[str(third.image_id)]["labels"]) == len(third.labels)


def test_proposals_replace_ground_truth(demo_data, tiny_backbones, tmp_path):
    coco = json.loads(Path(demo_data["val_json"]).read_text())
    proposals = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 0.25} for a in coco["annotations"]]
    props = tmp_path / "props.json"
    props.write_text(json.dumps(proposals))
    cfg = _config(demo_data, tiny_backbones, tmp_path / "out", split="val", boxes=str(props), limit=3)
    run_extraction(cfg)
    for s in _samples(tmp_path / "out").values():
        assert (s["labels"] == -1).all() and np.allclose(s["scores"], 0.25) and len(s["labels"]) > 0
    props.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(AnnotationError, match="entry 'not' is not .*keyed by image id"):
        run_extraction(cfg)
    props.write_text(json.dumps("boxes"))
    with pytest.raises(AnnotationError, match="COCO results list"):
        load_coco(demo_data["val_json"], props)


def test_cli_runs_from_a_config_file(demo_data, tiny_backbones, tmp_path, capsys):
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(
        f"dataset: mini\nimages: {demo_data['val_images']}\nannotations: {demo_data['val_json']}\n"
        f"out: {tmp_path / 'shards'}\nsam_type: tiny\nsam_checkpoint: {tiny_backbones['sam_checkpoint']}\n"
        f"clip_model: {tiny_backbones['clip_dir']}\nshard_size: 8\ndevice: cpu\nworkers: 1\n"
        f"text_cache: {tmp_path / 'text.h5'}\n"
    )
    assert main(["--config", str(cfg), "--limit", "5", "--masks", "false"]) == 0
    assert "extraction done: images 5" in capsys.readouterr().out
    samples = _samples(tmp_path / "shards")
    assert len(samples) == 5 and all("masks" not in s["meta"] for s in samples.values())
    assert (tmp_path / "text.h5").is_file()  # the vocabulary's text embeddings are cached too


def test_openimages_converter(tmp_path):
    import runpy

    convert = runpy.run_path("scripts/openimages_to_coco.py")["convert"]
    (tmp_path / "img").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "img" / "abc.jpg")
    (tmp_path / "classes.csv").write_text("/m/01,Cat\n/m/02,Dog\n")
    (tmp_path / "boxes.csv").write_text(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
        "abc,x,/m/02,1,0.1,0.6,0.2,0.8,0,0,0,0,0\nabc,x,/m/01,1,0,1,0,1,0,0,1,0,0\n"
    )
    coco = convert(tmp_path / "boxes.csv", tmp_path / "classes.csv", tmp_path / "img")
    assert [c["name"] for c in coco["categories"]] == ["Cat", "Dog"]
    dog = coco["annotations"][0]
    assert dog["category_id"] == 2 and np.allclose(dog["bbox"], [20, 20, 100, 60]) and dog["iscrowd"] == 0
    assert coco["annotations"][1]["iscrowd"] == 1  # IsGroupOf: skipped by the extractor like COCO crowds
    (tmp_path / "c.json").write_text(json.dumps(coco))
    records, vocab, stats = load_coco(tmp_path / "c.json")
    assert stats.crowd_skipped == 1 and records[0].labels.tolist() == [1]
