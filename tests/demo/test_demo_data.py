"""Tests for the embedded demo scene set (regionspot_pl.demo)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionspot_pl.demo import (
    demo_categories,
    frequency_of,
    frequency_thresholds,
    generate_demo_dataset,
    render_preview,
)
from regionspot_pl.demo.scenes import DemoDataError, main

SMALL = {"num_train": 24, "num_val": 14, "image_size": 128}


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One default-size set (600 + 120 images of 256 px, about 10 s on 2 cores)."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo_default"))


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo_small"), **SMALL)


def _files(paths: dict[str, Path]) -> dict[str, bytes]:
    root = paths["root"]
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


def test_same_seed_is_byte_identical(small_set: dict[str, Path], tmp_path: Path) -> None:
    again = generate_demo_dataset(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small_set)


def test_other_seed_differs(small_set: dict[str, Path], tmp_path: Path) -> None:
    other = generate_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    assert other["train_json"].read_bytes() != small_set["train_json"].read_bytes()
    first = sorted(small_set["train_images"].glob("*.jpg"))[0].name
    assert (other["train_images"] / first).read_bytes() != (small_set["train_images"] / first).read_bytes()


def test_skips_when_already_generated_and_redraws_on_change(tmp_path: Path) -> None:
    paths = generate_demo_dataset(tmp_path, **SMALL)
    stamp = paths["train_json"].stat().st_mtime_ns
    assert generate_demo_dataset(tmp_path, **SMALL) == paths
    assert paths["train_json"].stat().st_mtime_ns == stamp  # nothing rewritten
    changed = dict(SMALL, num_train=SMALL["num_train"] - 4)
    generate_demo_dataset(tmp_path, **changed)
    assert len(_load(paths["train_json"])["images"]) == changed["num_train"]
    assert len(list(paths["train_images"].glob("*.jpg"))) == changed["num_train"]  # no stale files
    assert _load(paths["params"])["num_train"] == changed["num_train"]


def test_rejects_a_val_split_too_small_to_hold_every_class(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match="--num_val >= 14"):
        generate_demo_dataset(tmp_path, num_train=10, num_val=3)


def test_categories_are_many_distinct_and_named(small_set: dict[str, Path]) -> None:
    cats = _load(small_set["train_json"])["categories"]
    assert len(cats) >= 30
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    names = [c["name"] for c in cats]
    assert len(set(names)) == len(names)
    assert small_set["vocabulary"].read_text().splitlines() == names
    triples = {(c["shape"], c["colour"], c["texture"]) for c in cats}
    assert len(triples) == len(cats)
    # No single cue names a class: every shape, colour and texture is shared by several classes.
    for key in ("shape", "colour", "texture"):
        assert min(Counter(c[key] for c in cats).values()) >= 2
    assert cats == _load(small_set["val_json"])["categories"]  # train counts in both, as LVIS v1
    assert {c.name for c in demo_categories()} == set(names)


def test_frequency_thresholds_match_lvis_at_default_size() -> None:
    assert frequency_thresholds(600) == (10, 100)
    assert [frequency_of(n, 600) for n in (1, 10, 11, 100, 101)] == ["r", "r", "c", "c", "f"]


def _check_counts(paths: dict[str, Path], num_train: int) -> list[dict]:
    train = _load(paths["train_json"])
    images = defaultdict(set)
    instances = Counter()
    for a in train["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    for c in train["categories"]:
        assert c["image_count"] == len(images[c["id"]]), c["name"]
        assert c["instance_count"] == instances[c["id"]], c["name"]
        assert c["frequency"] == frequency_of(c["image_count"], num_train), c["name"]
    return train["categories"]


def test_declared_frequency_equals_counted_small(small_set: dict[str, Path]) -> None:
    _check_counts(small_set, SMALL["num_train"])


def test_default_set_has_a_long_tail(default_set: dict[str, Path]) -> None:
    cats = _check_counts(default_set, 600)
    tiers = Counter(c["frequency"] for c in cats)
    assert min(tiers["r"], tiers["c"], tiers["f"]) >= 5, tiers
    # Rare classes are genuinely rare but still present in training.
    assert all(1 <= c["image_count"] <= 10 for c in cats if c["frequency"] == "r")
    assert max(c["image_count"] for c in cats) > 200


def test_every_class_is_scored_in_val(default_set: dict[str, Path], small_set) -> None:
    for paths, least in ((default_set, 8), (small_set, 1)):
        val = _load(paths["val_json"])
        per_class = Counter(a["category_id"] for a in val["annotations"])
        assert set(per_class) == {c["id"] for c in val["categories"]}
        assert min(per_class.values()) >= least


@pytest.mark.parametrize("split", ["train_json", "val_json"])
def test_images_and_negatives(small_set: dict[str, Path], split: str) -> None:
    data = _load(small_set[split])
    all_ids = {c["id"] for c in data["categories"]}
    present = defaultdict(set)
    for a in data["annotations"]:
        present[a["image_id"]].add(a["category_id"])
    folder = small_set["train_images" if split == "train_json" else "val_images"]
    for im in data["images"]:
        assert 3 <= len(present[im["id"]]) <= 8
        # Every object is annotated, so every absent class is a verified negative.
        assert sorted(im["neg_category_ids"]) == sorted(all_ids - present[im["id"]])
        assert im["not_exhaustive_category_ids"] == []
        with Image.open(folder / im["file_name"]) as pic:  # file_name is relative to the split
            assert pic.size == (im["width"], im["height"]) == (SMALL["image_size"],) * 2


def test_train_and_val_image_ids_do_not_collide(small_set: dict[str, Path]) -> None:
    train = {im["id"] for im in _load(small_set["train_json"])["images"]}
    val = {im["id"] for im in _load(small_set["val_json"])["images"]}
    assert not train & val


def test_boxes_areas_and_masks_agree(default_set: dict[str, Path]) -> None:
    from pycocotools import mask as mask_util

    data = _load(default_set["val_json"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids)
    big_enough = 0
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert a["iscrowd"] == 0
        rle = a["segmentation"]
        assert rle["size"] == [height, width]
        assert 0 < a["area"] <= w * h
        assert a["area"] == int(mask_util.area(rle))
        assert list(mask_util.toBbox(rle)) == pytest.approx([x, y, w, h])
        big_enough += max(w, h) >= width / 8
    # Objects stay recognizable for a 16-pixel-patch CLIP at 224 input.
    assert big_enough == len(data["annotations"])


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_some_objects_overlap(default_set: dict[str, Path]) -> None:
    data = _load(default_set["val_json"])
    by_image = defaultdict(list)
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a["bbox"])
    ious = [_iou(a, b) for boxes in by_image.values() for a, b in combinations(boxes, 2)]
    overlapping = sum(v > 0.05 for v in ious)
    assert overlapping >= len(by_image) // 2, overlapping
    assert max(ious) < 0.95  # occluders leave a visible part of everything they cover


def test_loads_with_pycocotools_and_lvis(small_set: dict[str, Path]) -> None:
    from lvis import LVIS
    from pycocotools.coco import COCO

    for key in ("train_json", "val_json"):
        coco = COCO(str(small_set[key]))
        assert len(coco.getCatIds()) == len(demo_categories())
        lvis = LVIS(str(small_set[key]))
        ann = lvis.load_anns([lvis.get_ann_ids()[0]])[0]
        assert lvis.ann_to_mask(ann).sum() == ann["area"]
        assert {c["frequency"] for c in lvis.load_cats(None)} <= {"r", "c", "f"}


def test_scenes_are_not_blank(small_set: dict[str, Path]) -> None:
    pic = np.asarray(Image.open(next(small_set["train_images"].glob("*.jpg"))), np.float32)
    assert pic.std() > 20  # objects and clutter, not a flat fill


def test_render_preview(small_set: dict[str, Path]) -> None:
    path = render_preview(small_set["root"], n=3)
    with Image.open(path) as pic:
        assert pic.width > 0 and pic.height > 0


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--num_train", "6", "--num_val", "14", "--image_size", "96"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["train_json"]).is_file()
