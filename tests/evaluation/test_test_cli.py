"""``python -m regionspot_pl.test``: end to end on tiny backbones, the scoring path, baselines, configs.

Bad input (exit 2, one ``error:`` line) is tested in tests/evaluation/test_errors_test.py.

One demo val split (20 images) is extracted once per module into GT-box shards and proposal
shards; the runs below all read them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from tolerances import probability_rtol

from regionspot_pl import test as test_cli
from regionspot_pl.backbones.clip import CLIP_MEAN, CLIP_STD, text_embeddings
from regionspot_pl.cache.manifest import Manifest
from regionspot_pl.cache.shards import AtomicShardWriter, encode_sample, iter_samples, list_shards
from regionspot_pl.demo.scenes import generate_demo_dataset
from regionspot_pl.evaluation import LVIS_METRICS
from regionspot_pl.evaluation.baselines import box_crops, crop_window
from regionspot_pl.extract import cli as extract
from regionspot_pl.model import RegionSpotHead, load_head, region_logits, save_head
from regionspot_pl.train.datamodule import collate_regions
from regionspot_pl.train.module import RegionSpotModule
from regionspot_pl.utils.io import batched

NUM_VAL = 20
PROPOSAL_SCORE = 0.5


def _extract(tiny: dict, demo: dict, out: Path, text_cache: Path, boxes: Path | None = None) -> Path:
    flags = {
        "--images": demo["val_images"],
        "--annotations": demo["val_json"],
        "--out": out,
        **{"--sam_type": "tiny", "--sam_checkpoint": tiny["sam_checkpoint"], "--clip_model": tiny["clip_dir"]},
        **{"--shard_size": 8, "--text_cache": text_cache, "--workers": 0},
        **({"--boxes": boxes} if boxes else {}),
    }
    assert extract.main([str(v) for flag_value in flags.items() for v in flag_value]) == 0
    return out


def _head(path: Path, seed: int = 0, **sizes) -> Path:
    torch.manual_seed(seed)
    return save_head(RegionSpotHead(**{"clip_dim": 128, "text_dim": 64, "ffn_dim": 256, "num_heads": 4, **sizes}), path)


@pytest.fixture(scope="module")
def split(tiny_backbones, tmp_path_factory) -> dict:
    """Demo val split, its GT-box and proposal shards, a head sized to the tiny backbones."""
    root = tmp_path_factory.mktemp("test_cli")
    demo = generate_demo_dataset(root / "demo", num_train=4, num_val=NUM_VAL, image_size=128, seed=0)
    text_cache = root / "text.h5"
    gt_shards = _extract(tiny_backbones, demo, root / "shards_gt", text_cache)
    # Proposals: every GT box twice (as is, and shifted by a pixel), score 0.5. Twice as many
    # boxes make boxes x 40 classes exceed 300 on most images, so the cap is exercised.
    gt = json.loads(Path(demo["val_json"]).read_text())
    props = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        props += [
            {"image_id": a["image_id"], "bbox": [x, y, w, h], "score": PROPOSAL_SCORE},
            {"image_id": a["image_id"], "bbox": [x + 1, y + 1, w - 1, h - 1], "score": PROPOSAL_SCORE},
        ]
    (root / "proposals.json").write_text(json.dumps(props))
    prop_shards = _extract(tiny_backbones, demo, root / "shards_props", text_cache, root / "proposals.json")
    return {
        "root": root,
        "demo": demo,
        "gt": gt,
        "annotations": str(demo["val_json"]),
        "gt_shards": gt_shards,
        "prop_shards": prop_shards,
        "head": _head(root / "head.pt"),
        "text_cache": text_cache,
        "tiny": tiny_backbones,
    }


def _run(split: dict, out: Path, *extra: str, shards: Path | None = None, head: Path | None = None) -> int:
    argv = [
        "--shards",
        str(shards or split["gt_shards"]),
        "--annotations",
        split["annotations"],
        "--head",
        str(head or split["head"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    return test_cli.main(argv)


@pytest.fixture(scope="module")
def gt_run(split) -> Path:
    """The regionspot method on GT boxes, 4 images per batch (so boxes get padded)."""
    out = split["root"] / "run_gt"
    assert _run(split, out, "--batch_size", "4") == 0
    return out


def _head_probs(split: dict, shards: Path, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [N, C] of one image computed directly from the head, and its boxes."""
    manifest = Manifest.read(shards)
    # the run above filled the cache: no encoder is needed to read it back
    texts = text_embeddings(None, manifest.vocabulary.names, split["text_cache"], manifest.clip.id)
    sample = next(s for s in iter_samples(list_shards(shards)) if s["meta"]["image_id"] == image_id)
    head = load_head(split["head"])
    with torch.no_grad():
        regions = head(
            torch.from_numpy(sample["sam"].astype(np.float32))[None],
            torch.from_numpy(sample["clip"].astype(np.float32))[None],
        )
    return region_logits(regions, texts)[0].softmax(-1).numpy(), sample["boxes"]


def _by_image(dets: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for d in dets:
        out.setdefault(d["image_id"], []).append(d)
    return out


# the CLI's head runs on batches of padded images, _head_probs on one image: the same sums in
# another order, the longest 256 long (the SAM token's projection and the head's MLP)
SCORE_RTOL = probability_rtol(256)


def _check_scores(dets: list[dict], probs: np.ndarray, boxes: np.ndarray, cat_ids: list[int], factor: float) -> None:
    """Every detection's score = factor x the head's probability of its (box, class); top-K kept."""
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    for d in dets:
        b = int(np.argmin(np.abs(xywh - np.asarray(d["bbox"])).sum(axis=1)))
        assert np.allclose(xywh[b], d["bbox"], atol=1e-4)
        c = cat_ids.index(d["category_id"])
        assert d["score"] == pytest.approx(factor * probs[b, c], rel=SCORE_RTOL, abs=1e-7)
    k = len(dets)
    best = np.sort(factor * probs.ravel())[::-1][:k]
    np.testing.assert_allclose(sorted((d["score"] for d in dets), reverse=True), best, rtol=SCORE_RTOL, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# regionspot on GT boxes
# ---------------------------------------------------------------------------------------------


def test_end_to_end_writes_three_files(split, gt_run, capsys):
    metrics = json.loads((gt_run / "metrics.json").read_text())
    assert list(metrics) == ["scoring", "bbox", "segm"] and metrics.pop("scoring") == "regionspot"
    for values in metrics.values():
        assert sorted(values) == sorted(LVIS_METRICS)
        assert all(v is None or 0.0 <= v <= 1.0 for v in values.values())
    assert metrics["bbox"]["AP"] is not None and metrics["bbox"]["APr"] is not None

    bbox = json.loads((gt_run / "detections_bbox.json").read_text())
    segm = json.loads((gt_run / "detections_segm.json").read_text())
    assert bbox and len(bbox) == len(segm)
    assert {frozenset(d) for d in bbox} == {frozenset({"image_id", "category_id", "bbox", "score"})}
    # the same detections; mask results carry no bbox (LVIS takes their areas from the masks)
    assert all("bbox" not in d for d in segm)
    assert [{k: v for k, v in d.items() if k != "segmentation"} for d in segm] == [
        {k: v for k, v in d.items() if k != "bbox"} for d in bbox
    ]
    # each segmentation is the SAM mask the shards hold for that box
    sample = next(iter_samples(list_shards(split["gt_shards"])))
    xyxy = sample["boxes"]
    for d, box in ((d, b) for d, b in zip(segm, bbox) if d["image_id"] == sample["meta"]["image_id"]):
        x, y, w, h = box["bbox"]  # the box detection of the same rank
        b = int(np.argmin(np.abs(xyxy - [x, y, x + w, y + h]).sum(axis=1)))
        assert d["segmentation"] == sample["meta"]["masks"][b]
    assert {d["image_id"] for d in bbox} == {im["id"] for im in split["gt"]["images"]}


def test_prints_table_timings(split, tmp_path, capsys):
    assert _run(split, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "head pass:" in out and "metric step:" in out
    assert "APr" in out and out.count("bbox") >= 1 and "segm" in out


def test_gt_scores_are_head_softmax(split, gt_run):
    dets = _by_image(json.loads((gt_run / "detections_bbox.json").read_text()))
    cat_ids = sorted(c["id"] for c in split["gt"]["categories"])
    for image_id in sorted(dets)[:3]:
        probs, boxes = _head_probs(split, split["gt_shards"], image_id)
        assert len(dets[image_id]) == min(300, probs.size)
        _check_scores(dets[image_id], probs, boxes, cat_ids, 1.0)


def test_fit_validation_makes_the_tests_detections(split, gt_run):
    """fit's validation_step and the test share one path from logits to results: on the same
    head, shards, texts and batches of 4 images they give the same detections, to the bit."""
    manifest = Manifest.read(split["gt_shards"])
    texts = text_embeddings(None, manifest.vocabulary.names, split["text_cache"], manifest.clip.id)
    head = load_head(split["head"])
    module = RegionSpotModule(
        head=head.config.to_dict(), val_text_embeddings=texts, val_category_ids=manifest.vocabulary.category_ids
    )
    module.head.load_state_dict(head.state_dict())
    module.eval()
    for i, chunk in enumerate(batched(iter_samples(list_shards(split["gt_shards"])), 4)):
        for sample in chunk:
            sample["dataset_index"] = 0
        with torch.no_grad():
            module.validation_step(collate_regions(chunk), i)
    expected = json.loads((gt_run / "detections_bbox.json").read_text())
    assert expected and module._val_results == expected


# ---------------------------------------------------------------------------------------------
# proposals: score x class probability, 300 per image at most
# ---------------------------------------------------------------------------------------------


def test_proposals_score_times_prob_and_300_cap(split, tmp_path, capsys):
    out = tmp_path / "props"
    assert _run(split, out, "--topk", "1000", shards=split["prop_shards"]) == 0
    assert "capped at 300" in capsys.readouterr().out
    dets = _by_image(json.loads((out / "detections_bbox.json").read_text()))
    assert max(len(v) for v in dets.values()) == 300  # boxes x classes > 300 on some images
    cat_ids = sorted(c["id"] for c in split["gt"]["categories"])
    capped = [i for i, v in dets.items() if len(v) == 300]
    for image_id in [capped[0], min(dets)]:
        probs, boxes = _head_probs(split, split["prop_shards"], image_id)
        assert len(dets[image_id]) == min(300, probs.size)
        _check_scores(dets[image_id], probs, boxes, cat_ids, PROPOSAL_SCORE)
    assert max(d["score"] for v in dets.values() for d in v) <= PROPOSAL_SCORE + 1e-6


# ---------------------------------------------------------------------------------------------
# CLIP crop baselines
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["clip-box", "clip-mask"])
def test_baselines_run_and_write_metrics(split, tmp_path, method):
    out = tmp_path / method
    # --images defaults to the folder named in the shards' manifest
    assert (
        test_cli.main(
            [
                "--shards",
                str(split["gt_shards"]),
                "--annotations",
                split["annotations"],
                "--method",
                method,
                "--out",
                str(out),
                "--batch_size",
                "16",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"scoring", "bbox", "segm"} and metrics["bbox"]["AP"] is not None
    dets = json.loads((out / "detections_bbox.json").read_text())
    assert {d["image_id"] for d in dets} == {im["id"] for im in split["gt"]["images"]}  # every shard read once
    assert all(len(v) <= 300 for v in _by_image(dets).values())


def test_clip_mask_fills_outside_with_mean_colour():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, 3:5] = 1
    rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
    rle["counts"] = rle["counts"].decode()
    box = np.array([[2.5, 1.2, 6.0, 5.0]], np.float32)  # -> pixels x 2..6, y 1..5: a 4x4 crop
    assert crop_window(box[0].tolist(), 10, 8) == (2, 1, 6, 5)
    std, mean = torch.tensor(CLIP_STD).view(3, 1, 1), torch.tensor(CLIP_MEAN).view(3, 1, 1)
    plain = (box_crops(image, box, 4)[0] * std + mean) * 255
    masked = (box_crops(image, box, 4, [rle])[0] * std + mean) * 255
    crop = torch.from_numpy(image[1:5, 2:6]).permute(2, 0, 1).float()
    inside = torch.from_numpy(mask[1:5, 2:6].astype(bool))
    fill = torch.from_numpy(image.reshape(-1, 3).mean(0)).round().float()
    torch.testing.assert_close(plain, crop, atol=1e-3, rtol=0)
    torch.testing.assert_close(masked[:, inside], crop[:, inside], atol=1e-3, rtol=0)
    torch.testing.assert_close(masked[:, ~inside], fill[:, None].expand(3, int((~inside).sum())), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# config, vocabulary, masks off
# ---------------------------------------------------------------------------------------------


def test_split_config_and_flags_override(split, tmp_path, monkeypatch):
    (tmp_path / "configs" / "test").mkdir(parents=True)
    (tmp_path / "configs" / "test" / "mini.yaml").write_text(
        f"shards: {split['gt_shards']}\nannotations: {split['annotations']}\nhead: /nowhere/head.pt\n"
        "method: regionspot\ntopk: 300\nout: from_yaml\n"
    )
    monkeypatch.chdir(tmp_path)  # a preset in ./configs comes before the shipped ones
    assert test_cli.main(["--split", "mini", "--head", str(split["head"]), "--device", "cpu"]) == 0
    assert (tmp_path / "from_yaml" / "metrics.json").is_file()


def test_lvis_val_preset_settings():
    config = test_cli.COMMAND.parse(["--split", "lvis_val"])
    assert (config.shards, config.annotations, config.head) == (
        "cache/shards/lvis_val",
        "/data/lvis/lvis_v1_val.json",
        "runs/advanced/head.pt",
    )
    assert (config.method, config.topk, config.out, config.batch_size) == (
        "regionspot",
        300,
        "runs/test/lvis_val",
        None,
    )
    assert config.batch() == test_cli.DEFAULT_BATCH["regionspot"]
    assert dataclasses.replace(config, method="clip-box").batch() == test_cli.DEFAULT_BATCH["clip-box"]


def test_split_without_out_writes_under_runs_test_split(tmp_path, monkeypatch):
    (tmp_path / "configs" / "test").mkdir(parents=True)
    (tmp_path / "configs" / "test" / "mini.yaml").write_text("shards: s\nannotations: a.json\nhead: h.pt\n")
    monkeypatch.chdir(tmp_path)
    assert test_cli.COMMAND.parse(["--split", "mini"]).out == "runs/test/mini"
    assert test_cli.COMMAND.parse(["--split", "mini", "--out", "elsewhere"]).out == "elsewhere"


def test_vocab_file_renames_and_computes_missing_texts(split, tmp_path):
    names = [f"thing number {i}" for i in range(len(split["gt"]["categories"]))]
    (tmp_path / "vocab.txt").write_text("\n".join(names) + "\n")
    cache = tmp_path / "fresh_text.h5"  # empty cache: the CLIP text encoder must run
    assert _run(split, tmp_path / "out", "--vocab", str(tmp_path / "vocab.txt"), "--text_cache", str(cache)) == 0
    assert cache.is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["bbox"]["AP"] is not None


def test_no_masks_shards_skip_segm(split, tmp_path, capsys):
    """Shards written with --masks false (rewritten here from the GT shards, without the masks)."""
    folder = tmp_path / "nomask"
    folder.mkdir()
    for shard in list_shards(split["gt_shards"]):
        writer = AtomicShardWriter(folder / shard.name)
        for s in iter_samples([shard]):
            meta = {k: v for k, v in s["meta"].items() if k not in ("masks", "image_id")}
            writer.write(
                encode_sample(
                    s["meta"]["image_id"], s["sam"], s["boxes"], s["labels"], s["scores"], s["clip"], meta, iou=s["iou"]
                )
            )
        writer.commit({})
    manifest = Manifest.read(split["gt_shards"])
    manifest.config["masks"] = False
    manifest.write(folder)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "detections_segm.json").write_text("[]")  # stale file of an earlier run
    assert _run(split, out, shards=folder) == 0
    assert "--masks false" in capsys.readouterr().out
    assert set(json.loads((out / "metrics.json").read_text())) == {"scoring", "bbox"}
    assert not (out / "detections_segm.json").exists()
