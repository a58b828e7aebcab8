"""Bad input never trains silently and never hangs: each stage checks its inputs before the work
starts, names the file, the record and the fix, and counts what it drops, by reason.

One test (or a few) per finding of the robustness review, numbered as there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny_fit import TINY_MODEL, tiny_fit_config

from regionspot_pl import RegionSpotHead, save_head
from regionspot_pl import test as test_cli
from regionspot_pl.backbones.sam import SamTransform
from regionspot_pl.backbones.tiny import write_tiny_backbones
from regionspot_pl.cache.manifest import Manifest, ShardFolder
from regionspot_pl.cache.shards import (
    AtomicShardWriter,
    ShardFormatError,
    encode_sample,
    iter_samples,
    list_shards,
)
from regionspot_pl.config import ConfigError
from regionspot_pl.data.annotations import AnnotationError
from regionspot_pl.data.records import load_coco, read_proposals
from regionspot_pl.extract.cli import main as extract_main
from regionspot_pl.extract.run import ExtractConfig, ExtractError, ImageFeaturesInput, run_extraction
from regionspot_pl.fit import main as fit_main
from regionspot_pl.fit import run
from regionspot_pl.train.datamodule import DataConfig, DataConfigError, RegionDataModule, ShardStream
from regionspot_pl.utils.io import AtomicFile, FolderLock, write_json_atomic

# ------------------------------------------------------------------------------------ helpers


def _mini_set(demo_data, tmp_path: Path, n: int = 2, edit=None) -> tuple[Path, Path]:
    """The first ``n`` demo val images and their annotations; ``edit(coco, images_dir)`` changes them."""
    coco = json.loads(Path(demo_data["val_json"]).read_text())
    coco["images"] = coco["images"][:n]
    ids = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        shutil.copy(Path(demo_data["val_images"]) / im["file_name"], images / im["file_name"])
    if edit is not None:
        edit(coco, images)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco))
    return images, ann


def _extract_cfg(tiny_backbones, images, ann, out, **kw) -> ExtractConfig:
    return ExtractConfig(
        images=str(images),
        annotations=str(ann),
        out=str(out),
        sam_type="tiny",
        sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
        clip_model=str(tiny_backbones["clip_dir"]),
        dataset="mini",
        workers=0,
        text_cache=str(Path(out).parent / "text.h5"),
        **kw,
    )


def _extract_argv(tiny_backbones, images, ann, out, *extra) -> list[str]:
    return [
        "--images",
        str(images),
        "--annotations",
        str(ann),
        "--out",
        str(out),
        "--sam_type",
        "tiny",
        "--sam_checkpoint",
        str(tiny_backbones["sam_checkpoint"]),
        "--clip_model",
        str(tiny_backbones["clip_dir"]),
        "--workers",
        "0",
        "--text_cache",
        str(Path(out).parent / "text.h5"),
        *extra,
    ]


def _error_line(capsys) -> str:
    """The one `error:` line a CLI prints for bad input (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _fit_cfg(train, out, steps=4, val=None, val_json=None, **data) -> dict:
    if val:
        data |= {"val_shards": str(val), "val_annotations": str(val_json)}
    return tiny_fit_config(train, out, steps, data=data)


def _fit_yaml(tmp_path, cfg) -> str:
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _rewrite(src: Path, dst: Path, labels=None, sidecar_counts: bool = True) -> Path:
    """A copy of a shard folder written sample by sample, labels optionally replaced; without the
    sidecars' vocabulary counts when ``sidecar_counts`` is False (shards of an older writer)."""
    dst.mkdir()
    for shard in list_shards(src):
        writer = AtomicShardWriter(dst / shard.name)
        for s in iter_samples([shard]):
            meta = {k: v for k, v in s["meta"].items() if k != "image_id"}
            lab = s["labels"] if labels is None else labels(s["labels"])
            writer.write(
                encode_sample(
                    s["meta"]["image_id"], s["sam"], s["boxes"], lab, s["scores"], s["clip"], meta, iou=s["iou"]
                )
            )
        writer.commit({"num_classes": 40} if sidecar_counts else {})
        if not sidecar_counts:
            side = json.loads((dst / shard.name).with_suffix(".json").read_text())
            (dst / shard.name).with_suffix(".json").write_text(
                json.dumps({k: v for k, v in side.items() if k not in ("max_label", "num_classes")})
            )
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


@pytest.fixture(scope="module")
def shards(demo_shards, demo_data):
    return {**demo_shards, "val_json": demo_data["val_json"], "train_json": demo_data["train_json"]}


# ------------------------------------------------------- 1 and 12: nothing usable is an error


def test_01_12_extraction_reading_no_image_fails_and_fit_refuses_its_empty_shards(
    demo_data, tiny_backbones, tmp_path, capsys
):
    def corrupt(coco, images):
        for im in coco["images"]:
            (images / im["file_name"]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")

    images, ann = _mini_set(demo_data, tmp_path, edit=corrupt)
    out = tmp_path / "out"
    assert extract_main(_extract_argv(tiny_backbones, images, ann, out)) == 2
    line = _error_line(capsys)
    assert "no image of" in line and "2 skipped (2 undecodable)" in line and "could not be decoded" in line
    manifest = Manifest.read(out)
    assert manifest.counts["samples"] == 0 and manifest.counts["skipped_by_reason"] == {"undecodable": 2}
    (shard,) = list_shards(out)  # one shard of 0 samples: a rerun has nothing left to try, and fails again
    assert extract_main(_extract_argv(tiny_backbones, images, ann, out)) == 2
    assert "2 undecodable" in _error_line(capsys)

    # fit: refused before training (no step, no checkpoint), from the sidecar counts...
    assert fit_main(["--config", _fit_yaml(tmp_path, _fit_cfg(out, tmp_path / "fit"))]) == 2
    assert "hold no sample" in _error_line(capsys) and not (tmp_path / "fit" / "checkpoints").exists()
    # ...and a reader given only empty shards (no sidecars to tell) raises instead of spinning
    with pytest.raises(ShardFormatError, match="hold no sample"):
        next(iter(ShardStream([str(shard)], 0, repeat=True)))


# ------------------------------------------------------------------- 2: numeric flags


@pytest.mark.parametrize("size", [0, -3])
def test_02_batch_size_zero_or_negative_is_refused_at_once(shards, tmp_path, capsys, size):
    cfg = _fit_cfg(shards["train"], tmp_path / "fit", batch_size=size)
    assert fit_main(["--config", _fit_yaml(tmp_path, cfg)]) == 2
    line = _error_line(capsys)
    assert f"--data.batch_size is {size}; it must be >= 1 (data.batch_size in " in line
    assert not (tmp_path / "fit" / "checkpoints").exists()  # refused before any training
    with pytest.raises(DataConfigError, match="it must be >= 1"):
        DataConfig([str(shards["train"])], batch_size=size)


def test_02_other_numbers_are_checked_before_the_work(shards, tiny_backbones, demo_data, tmp_path, capsys):
    for key, value, match in (
        ("workers", -1, "--data.workers is -1"),
        ("max_boxes_per_image", 0, "--data.max_boxes_per_image is 0"),
        ("mix_weights", [float("nan")], "--data.mix_weights item is nan; it must be a finite number"),
    ):
        with pytest.raises(ConfigError, match=match):
            run(_fit_cfg(shards["train"], tmp_path / "a", **{key: value}))
    bad = _fit_cfg(shards["train"], tmp_path / "b")
    bad["trainer"]["max_steps"] = 0
    with pytest.raises(ConfigError, match="--trainer.max_steps is 0"):
        run(bad)
    images, ann = demo_data["val_images"], demo_data["val_json"]
    for flag, value in (
        ("--shard_size", "0"),
        ("--batch_size", "-1"),
        ("--workers", "-2"),
        ("--limit", "0"),
        ("--read_timeout", "0"),
    ):
        assert extract_main(_extract_argv(tiny_backbones, images, ann, tmp_path / "x", flag, value)) == 2
        assert f"{flag} " in _error_line(capsys)
    assert not (tmp_path / "x").exists()  # refused before anything was written


# --------------------------------------------------------------- 3 and 11: malformed records


def test_03_duplicate_image_ids_are_refused_naming_both_records(demo_data, tiny_backbones, tmp_path, capsys):
    def duplicate(coco, images):
        coco["images"][1]["id"] = coco["images"][0]["id"]

    images, ann = _mini_set(demo_data, tmp_path, edit=duplicate)
    assert extract_main(_extract_argv(tiny_backbones, images, ann, tmp_path / "out")) == 2
    line = _error_line(capsys)
    assert str(ann) in line and "image #1" in line and "of image #0" in line and "must be unique" in line
    coco = json.loads(ann.read_text())
    coco["images"][1]["id"] += 1
    coco["annotations"].append(dict(coco["annotations"][0]))  # the same annotation id twice
    ann.write_text(json.dumps(coco))
    with pytest.raises(AnnotationError, match=r"annotation #\d+ .* repeats the id of annotation #0"):
        load_coco(ann)


def _one_image(tmp_path, image=None, ann=None, cats=None, proposals=None) -> tuple[Path, Path | None]:
    im = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48} if image is None else image
    a = {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 10]} if ann is None else ann
    coco = {"images": [im], "categories": cats if cats is not None else [{"id": 5, "name": "cat"}], "annotations": [a]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    props = None
    if proposals is not None:
        props = tmp_path / "props.json"
        props.write_text(json.dumps(proposals))
    return path, props


DROP = object()  # the field is left out


@pytest.mark.parametrize(
    "field,change,match",
    [
        ("ann", {"bbox": None}, r"annotation #0 \(id 7\) .* bbox \[x, y, w, h\] must be a list of 4 numbers"),
        ("ann", {"bbox": [1, 2, 10]}, r"annotation #0 \(id 7\) .* has 3 numbers, not 4"),
        ("ann", {"bbox": DROP}, r"annotation #0 \(id 7\) .* lacks 'bbox'"),
        ("ann", {"category_id": DROP}, r"annotation #0 \(id 7\) .* lacks 'category_id'"),
        ("ann", {"image_id": DROP}, r"annotation #0 \(id 7\) .* lacks 'image_id'"),
        ("ann", {"image_id": "1"}, r"annotation #0 \(id 7\) .* non-integer image_id"),
        ("image", {"width": DROP}, r"image #0 .* lacks 'width'"),
        ("image", {"height": -4}, r"image #0 .* positive integer 'width'/'height'"),
        ("image", {"file_name": DROP}, r"image #0 \(id 1\) .* neither 'file_name' nor 'coco_url'"),
        ("image", {"file_name": None}, r"image #0 \(id 1\) .* has file_name None, not a non-empty path string"),
        # a null file_name is a malformed record, not a cue to fall back to coco_url
        ("image", {"file_name": None, "coco_url": "http://x/val2017/1.jpg"}, r"image #0 \(id 1\) .* file_name None"),
        ("image", {"file_name": 12}, r"image #0 .* not a non-empty path string"),
        ("cat", {"name": DROP}, r"category #0 .* is not \{\"id\": int, \"name\": non-empty str\}"),
    ],
)
def test_11_a_missing_or_mistyped_field_names_the_file_and_the_record(tmp_path, field, change, match):
    image = {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}
    ann = {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 10]}
    cat = {"id": 5, "name": "cat"}
    target = {"ann": ann, "image": image, "cat": cat}[field]
    for k, v in change.items():
        if v is DROP:
            target.pop(k)
        else:
            target[k] = v
    path, _ = _one_image(tmp_path, image, ann, [cat])
    with pytest.raises(AnnotationError, match=match) as err:
        load_coco(path)
    assert str(path) in str(err.value)


def test_11_a_malformed_proposal_names_the_file_and_the_entry(tmp_path):
    path, props = _one_image(
        tmp_path,
        proposals=[
            {"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
            {"image_id": 1, "bbox": [0, 0, 5], "score": 0.5},
        ],
    )
    with pytest.raises(AnnotationError, match=r"props.json: entry 1 .* has 3 numbers, not 4"):
        load_coco(path, props)


# ------------------------------------------------------------- 4: validation setup, early


def test_04_validation_annotations_of_another_split_are_refused_at_startup(shards, tmp_path, capsys):
    cfg = _fit_cfg(shards["train"], tmp_path / "fit", val=shards["val"], val_json=shards["train_json"])
    assert fit_main(["--config", _fit_yaml(tmp_path, cfg)]) == 2
    line = _error_line(capsys)
    assert "14 of the 14 images of the shards" in line and "ground truth of another split" in line
    assert not (tmp_path / "fit" / "checkpoints").exists()  # at startup: before any training


def test_04_fit_validates_at_step_0_and_checkpoints_before_every_validation(shards, tmp_path, monkeypatch):
    import regionspot_pl.train.module as module

    calls = []
    real = module.evaluate_detections

    def evaluate(gt, results, **kw):
        calls.append(len(results))
        if len(calls) == 3:  # the step-0 check, the validation at step 3, then one that fails at step 6
            raise ValueError("the evaluator refuses this ground truth")
        return real(gt, results, **kw)

    monkeypatch.setattr(module, "evaluate_detections", evaluate)
    cfg = _fit_cfg(shards["train"], tmp_path / "fit", steps=9, val=shards["val"], val_json=shards["val_json"])
    cfg["trainer"]["val_every"] = 3
    with pytest.raises(ValueError, match="refuses"):
        run(cfg)
    assert len(calls) == 3 and 0 < calls[0] < calls[1]  # step 0 scored 2 batches, step 3 the whole set
    last = torch.load(tmp_path / "fit" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # saved just before the validation that failed: nothing trained is lost

    def broken(gt, results, **kw):
        raise ValueError("broken")

    monkeypatch.setattr(module, "evaluate_detections", broken)
    steps = []

    class Steps(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    cfg = _fit_cfg(shards["train"], tmp_path / "fit0", steps=10_000, val=shards["val"], val_json=shards["val_json"])
    cfg["trainer"]["val_every"] = 10_000
    with pytest.raises(ValueError, match="broken"):
        run(cfg, callbacks=[Steps()])
    assert steps == []  # failed at step 0, before a single training step


# --------------------------------------------------- 5: every Pillow mode, with its pixels


@pytest.mark.parametrize("mode", ["I;16", "P", "CMYK", "LA"])
def test_05_images_of_any_pillow_mode_reach_the_encoders_with_their_pixels(tmp_path, mode):
    """Reading itself is tested in test_fidelity.py::test_read_image_any_pillow_mode; here the
    extraction's reader: a 16-bit PNG is not an all-white image, and its size is read."""
    ramp = np.tile(np.linspace(0, 1, 96), (40, 1))
    if mode == "I;16":
        image = Image.fromarray((ramp * 65535).astype(np.uint16))
    else:
        image = Image.fromarray((ramp * 255).astype(np.uint8)).convert(mode)
    name = "x.tif" if mode == "CMYK" else "x.png"
    image.save(tmp_path / name)
    from regionspot_pl.data.records import ImageRecord

    rec = ImageRecord(1, name, 96, 40, np.array([[0, 0, 50, 30]], np.float32), np.array([0]), np.ones(1, np.float32))
    sam = SamTransform(64, torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375]))
    item = ImageFeaturesInput([(0, rec)], str(tmp_path), sam)[0]
    assert "error" not in item, item.get("error")
    clip = item["input"].vlm_image.float()
    assert clip.shape[0] == 3 and clip.min() < 20 and clip.max() > 230  # the ramp, not white
    assert (clip[0, :, -1].mean() - clip[0, :, 0].mean()) > 200


# ------------------------------------------------ 6 and 10: dropped before the work, counted


def test_06_10_non_finite_boxes_and_names_outside_images_are_dropped_and_counted(demo_data, tiny_backbones, tmp_path):
    def spoil(coco, images):
        first = coco["images"][0]
        coco["annotations"].append(
            {
                "id": 10**6,
                "image_id": first["id"],
                "category_id": 1,
                "area": 1,
                "iscrowd": 0,
                "bbox": [float("inf"), 0, 10, 10],
            }
        )
        coco["annotations"].append(
            {
                "id": 10**6 + 1,
                "image_id": first["id"],
                "category_id": 1,
                "area": 1,
                "iscrowd": 0,
                "bbox": [0, 0, float("nan"), 10],
            }
        )
        (tmp_path / "secret.jpg").write_bytes((images / coco["images"][1]["file_name"]).read_bytes())
        coco["images"][1]["file_name"] = "../secret.jpg"

    images, ann = _mini_set(demo_data, tmp_path, edit=spoil)
    records, _, stats = load_coco(ann)
    assert [r.image_id for r in records] == [json.loads(ann.read_text())["images"][0]["id"]]
    assert stats.non_finite_dropped == 2 and stats.images_outside == 1
    assert np.isfinite(records[0].boxes).all() and records[0].boxes.max() <= 256
    summary = run_extraction(_extract_cfg(tiny_backbones, images, ann, tmp_path / "out"))
    assert summary["images"] == 1
    assert summary["dropped"]["non-finite boxes"] == 2 and summary["dropped"]["images outside the image folder"] == 1
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.annotations["non_finite_dropped"] == 2 and manifest.annotations["images_outside"] == 1
    (sample,) = iter_samples(list_shards(tmp_path / "out"))
    assert len(sample["boxes"]) == len(records[0].boxes) and np.isfinite(sample["boxes"]).all()


def test_06_non_finite_proposals_are_dropped_and_counted(tmp_path):
    path, props = _one_image(
        tmp_path,
        proposals=[
            {"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
            {"image_id": 1, "bbox": [0, 0, 1e999, 5], "score": 0.5},
            {"image_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")},
        ],
    )
    assert len(read_proposals(props)[1]) == 3  # read as they are; load_coco decides
    records, _, stats = load_coco(path, props)
    assert len(records[0].boxes) == 1 and stats.non_finite_dropped == 2 and stats.boxes == 1


# ------------------------------------------------------------ 7: nothing to train is an error


def test_07_no_annotations_no_classes_or_no_box_is_an_error(demo_data, tiny_backbones, tmp_path, capsys):
    cases = {
        "no annotations": (lambda c: c.pop("annotations"), "has no 'annotations' list"),
        "empty annotations": (lambda c: c.update(annotations=[]), "no usable ground-truth box"),
        "no classes": (lambda c: c.update(categories=[], annotations=[]), "a vocabulary of 0 classes"),
        "only crowd boxes": (lambda c: [a.update(iscrowd=1) for a in c["annotations"]], "crowd boxes"),
    }
    for name, (edit, match) in cases.items():
        images, ann = _mini_set(
            demo_data, tmp_path / name.replace(" ", "_"), n=1, edit=lambda coco, images, edit=edit: edit(coco)
        )
        assert extract_main(_extract_argv(tiny_backbones, images, ann, tmp_path / "out")) == 2, name
        assert match in _error_line(capsys), name
    assert not (tmp_path / "out").exists()  # all refused before the backbones loaded


def test_07_shards_without_a_labelled_box_do_not_train(shards, tmp_path, capsys):
    unlabelled = _rewrite(shards["train"], tmp_path / "unlabelled", labels=lambda lab: np.full_like(lab, -1))
    assert fit_main(["--config", _fit_yaml(tmp_path, _fit_cfg(unlabelled, tmp_path / "fit"))]) == 2
    assert "holds no box with a class" in _error_line(capsys)
    assert not (tmp_path / "fit" / "head.pt").exists()


# ----------------------------------------------- 8: the manifest's vocabulary against the shards


@pytest.mark.parametrize("classes", [10, 45])
def test_08_a_manifest_vocabulary_that_does_not_fit_the_shards_is_refused(shards, tmp_path, classes):
    folder = tmp_path / "edited"
    shutil.copytree(shards["train"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vocabulary"] = {
        "names": [f"class {i}" for i in range(classes)],
        "category_ids": list(range(classes)),
        "frequencies": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=f"vocabulary of {classes} classes .* one of 40"):
        ShardFolder.read(str(folder))


def test_08_labels_beyond_the_vocabulary_are_caught_without_sidecar_counts(shards, tmp_path):
    """Shards of an older writer have no vocabulary size in their sidecars: the reader checks each sample."""
    folder = _rewrite(shards["train"], tmp_path / "old", sidecar_counts=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["vocabulary"] = {"names": ["a", "b"], "category_ids": [1, 2], "frequencies": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    dm = RegionDataModule(DataConfig([str(folder)], batch_size=4, workers=0))
    with pytest.raises(ShardFormatError, match="has 2 classes: the manifest does not belong to these shards"):
        next(iter(dm.train_dataloader()))


# -------------------------------------------- 9 and 11: resuming, one owner per extraction folder


def test_09_11_resume_checks_precision_and_backbones_and_one_process_owns_the_folder(
    demo_data, tiny_backbones, tmp_path, capsys
):
    images, ann = _mini_set(demo_data, tmp_path, n=1)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = out / ".extract-r000.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # left by a killed run
    assert run_extraction(_extract_cfg(tiny_backbones, images, ann, out, precision="fp32"))["images"] == 1
    assert not lock.exists()  # taken over, then released
    assert Manifest.read(out).precision == "fp32"

    with pytest.raises(ExtractError, match=r"precision \(fp32 -> bf16"):
        run_extraction(_extract_cfg(tiny_backbones, images, ann, out, precision="bf16"))
    other = write_tiny_backbones(tmp_path / "other_backbones", seed=1)
    cfg = _extract_cfg(tiny_backbones, images, ann, out, precision="fp32")
    cfg.sam_checkpoint = str(other["sam_checkpoint"])
    with pytest.raises(ExtractError, match="sam weights"):
        run_extraction(cfg)

    with FolderLock(lock, "extraction folder"):  # another extraction of this rank is running
        assert extract_main(_extract_argv(tiny_backbones, images, ann, out, "--precision", "fp32")) == 2
        line = _error_line(capsys)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in line and str(lock) in line


def test_11_concurrent_writers_of_one_json_file_never_collide(tmp_path):
    errors = []

    def write(n):
        try:
            for i in range(200):
                write_json_atomic(tmp_path / "manifest.json", {"writer": n, "i": i})
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads((tmp_path / "manifest.json").read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_11_a_waiting_lock_serializes_read_modify_write(tmp_path):
    """FolderLock(wait=True), as the text cache takes it: every update of a counter kept by four
    threads survives (without the lock two threads read the same value and one update is lost)."""
    counter, errors = tmp_path / "counter.json", []
    write_json_atomic(counter, {"n": 0})

    def bump():
        try:
            for _ in range(50):
                with FolderLock(tmp_path / "counter.lock", "counter", wait=True):
                    n = json.loads(counter.read_text())["n"]
                    write_json_atomic(counter, {"n": n + 1})
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(counter.read_text())["n"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter.json", "counter.lock"]


def test_11_an_atomic_file_left_by_an_error_is_removed_and_the_old_file_kept(tmp_path):
    target = tmp_path / "head.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), AtomicFile(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["head.pt"]
    with AtomicFile(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not in place before the block ends
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["head.pt"]


# ------------------------------------------------------------------- 12: test --topk 0


@pytest.mark.parametrize("flag,value", [("--topk", "0"), ("--batch_size", "0")])
def test_12_test_refuses_a_zero_count(shards, tmp_path, capsys, flag, value):
    head = save_head(
        RegionSpotHead(clip_dim=128, text_dim=64, **{k: v for k, v in TINY_MODEL.items() if k != "variant"}),
        tmp_path / "head.pt",
    )
    argv = [
        "--shards",
        str(shards["val"]),
        "--annotations",
        str(shards["val_json"]),
        "--head",
        str(head),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        flag,
        value,
    ]
    assert test_cli.main(argv) == 2
    line = _error_line(capsys)
    assert line == f"error: {flag} is 0; it must be >= 1"


# ---------------------------------------------------------------- nothing waits forever


def _wait_until_stalled_on_a_pipe(pid: int, timeout: float = 120) -> None:
    """Wait until loader worker ``pid`` is blocked reading a pipe that delivers nothing (the
    stalled shard), the one instant at which killing it tests our error path alone: it then holds
    no lock of the loader's (a worker SIGKILLed while holding the shared ``done`` event's lock,
    which it takes for each batch index it receives, leaves PyTorch's main process blocked forever
    on it) and is writing no batch (one killed while its queue thread writes a batch into the
    pipe to the main process leaves a partial message that the main process waits on forever,
    since it holds that pipe's write end too): PyTorch limitations no read timeout reaches. Where
    the kernel hides the wait channel, a worker sleeping on the same channel for a while is taken
    as stalled."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "S" and "pipe_read" in wchan:
            return
        seen = [*seen[-199:], (state, wchan)]
        if wchan in ("", "0") and len(seen) == 200 and all(s == ("S", wchan) for s in seen):
            return
        time.sleep(0.01)
    pytest.fail(f"loader worker {pid} never stalled on its pipe: last states {seen[-3:]}")


def test_a_stalled_read_or_a_dead_loader_worker_is_an_error_in_bounded_time(shards, tmp_path):
    stalled = tmp_path / "stalled"
    stalled.mkdir()
    shutil.copy(shards["train"] / "manifest.json", stalled)
    stall_s = 30
    (stalled / "shards.txt").write_text(f"pipe:sleep {stall_s}\n")  # a mount or pipe that delivers nothing
    dm = RegionDataModule(DataConfig([str(stalled)], batch_size=2, workers=1, read_timeout=2))
    start = time.monotonic()
    batches = iter(dm.train_dataloader())
    with pytest.raises(RuntimeError, match="timed out after 2 seconds"):
        next(batches)
    assert time.monotonic() - start < stall_s  # the timeout ended the read, not the pipe
    batches._shutdown_workers()

    # a dead worker is found by PyTorch's SIGCHLD handler, or at the latest when the read times out
    dm = RegionDataModule(DataConfig([str(stalled)], batch_size=2, workers=1, read_timeout=5))
    batches = iter(dm.train_dataloader())
    worker = batches._workers[0].pid
    _wait_until_stalled_on_a_pipe(worker)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exited unexpectedly|killed by signal"):
        os.kill(worker, 9)  # inside the block: the SIGCHLD handler may raise at once
        next(batches)
    # within the 5 s read_timeout (with room for a slow machine), not the default's 600 s
    assert time.monotonic() - start < DataConfig([str(shards["train"])]).read_timeout / 10
    batches._shutdown_workers()
