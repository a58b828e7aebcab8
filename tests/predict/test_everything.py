"""Name everything: the regions are SAM's automatic mask generator's masks, named through the
predictor's box path; COCO-layout JSON, pictures, folders, and bad input."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from segment_anything import SamAutomaticMaskGenerator
from test_prompts import scene  # the same three shapes (clipped at this smaller size)

from regionspot_pl.backbones.sam import build_sam, build_tiny_sam
from regionspot_pl.predict.cli import main
from regionspot_pl.predict.everything import GeneratorSettings, label_images, mask_box, name_everything

VOCAB = ["red circle", "blue square", "green triangle", "background"]
# small and fast on the tiny random SAM: its masks are noise-like and its predicted IoUs and
# stability scores low, so the default thresholds would keep none, and its masks nearly all
# cover the whole image, so SAM's NMS would keep one; 1.0 keeps all 4 x 4 points x 3 masks
SETTINGS = GeneratorSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
FLAGS = ["--generator.points_per_side", "4", "--generator.pred_iou_thresh", "0",
         "--generator.stability_score_thresh", "0", "--generator.box_nms_thresh", "1.0"]  # fmt: skip
HW = (96, 128)


@pytest.fixture(scope="module")
def setup(tiny_backbones, tiny_head, predictor, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("everything")
    head = tiny_head["file"]
    image = scene(*HW)
    images = root / "images"
    images.mkdir()
    Image.fromarray(image).save(images / "a.png")
    Image.fromarray(np.ascontiguousarray(image[::-1])).save(images / "b.jpg", quality=95)
    (images / "notes.txt").write_text("not an image: ignored")
    return {"root": root, "head": head, "predictor": predictor, "image": image, "text_cache": tiny_head["text_cache"],
            "images": images, "backbones": tiny_backbones}  # fmt: skip


def test_settings_are_the_generators_parameters_with_its_defaults():
    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    for name, value in vars(GeneratorSettings()).items():
        assert signature[name].default == value, name


def test_regions_are_the_generators_masks(setup):
    predictor, image = setup["predictor"], setup["image"]
    regions = name_everything(predictor, image, VOCAB, SETTINGS.build(predictor.encoder.segmenter))
    # the generator run independently, on its own SAM read from the same checkpoint
    sam = build_sam("tiny", setup["backbones"]["sam_checkpoint"])
    records = SamAutomaticMaskGenerator(sam, **vars(SETTINGS)).generate(image)
    assert len(records) == len(regions) == 48
    for region, record in zip(regions, records):
        assert np.array_equal(region["mask"], record["segmentation"])
        x, y, w, h = record["bbox"]
        assert region["box"] == [x, y, x + w + 1, y + h + 1]  # the pixels the mask covers
        assert region["area"] == record["area"]
        assert region["predicted_iou"] == pytest.approx(record["predicted_iou"])
    # named on the predictor's box path, all boxes of the image in one call
    predictor.set_image(image)
    named = predictor.predict([r["box"] for r in regions], VOCAB, topk=1)
    assert [r["label"] for r in regions] == [n["labels"][0] for n in named]
    np.testing.assert_allclose([r["score"] for r in regions], [n["scores"][0] for n in named],
                               rtol=0, atol=1e-6)  # fmt: skip


def test_with_sam2_the_regions_are_sam2s_generators_masks(setup, tiny_head):
    """SAM 2.1's own generator (sam2's SAM2AutomaticMaskGenerator) finds the regions."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from regionspot_pl import Predictor
    from regionspot_pl.backbones.sam2_model import build_sam2_model

    tiny = setup["backbones"]
    predictor = Predictor.from_pretrained(
        head=tiny_head["file"], sam_type=str(tiny["sam2_config"]), sam_checkpoint=tiny["sam2_checkpoint"],
        clip_model=tiny["clip_dir"], text_cache=tiny_head["text_cache"],
    )  # fmt: skip
    settings = replace(SETTINGS, points_per_side=2)  # SAM 2's decoder is the real size: fewer prompts
    regions = name_everything(predictor, setup["image"], VOCAB, settings.build(predictor.encoder.segmenter))
    # the generator run independently, on its own SAM 2 read from the same files
    sam2 = build_sam2_model(str(tiny["sam2_config"]), tiny["sam2_checkpoint"])
    records = SAM2AutomaticMaskGenerator(sam2, **vars(settings)).generate(setup["image"])
    assert len(records) == len(regions) > 0
    for region, record in zip(regions, records):
        assert np.array_equal(region["mask"], record["segmentation"])
        assert region["predicted_iou"] == pytest.approx(record["predicted_iou"])


def test_score_threshold_drops_regions(setup, tmp_path):
    # the tiny SAM at its default 512 px input: at the tests' 256 px every mask of the random
    # model covers the whole image, one box named 48 times with one score, nothing to cut between
    from regionspot_pl import Predictor

    sam = tmp_path / "sam_tiny.pth"
    torch.save(build_tiny_sam().state_dict(), sam)
    predictor = Predictor.from_pretrained(
        head=setup["head"], sam_type="tiny", sam_checkpoint=sam, clip_model=setup["backbones"]["clip_dir"],
        text_cache=setup["text_cache"],
    )  # fmt: skip
    image = setup["image"]
    generator = SETTINGS.build(predictor.encoder.segmenter)
    every = name_everything(predictor, image, VOCAB, generator)
    # most masks of the random SAM cover the whole image, so most scores are equal: cut
    # between the two highest distinct scores
    top = np.unique([r["score"] for r in every])[-2:]
    assert len(top) == 2
    thresh = float(top.mean())
    kept = name_everything(predictor, image, VOCAB, generator, score_thresh=thresh)
    expected = [r for r in every if r["score"] >= thresh]
    assert 0 < len(kept) < len(every)
    assert [r["box"] for r in kept] == [r["box"] for r in expected]


def test_label_images_writes_a_coco_data_set(setup, tmp_path):
    predictor = setup["predictor"]
    files = sorted(setup["images"].glob("*.*g"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    data = label_images(predictor, [*files, broken], VOCAB, SETTINGS, progress=False)
    assert [i["file_name"] for i in data["images"]] == ["a.png", "b.jpg"]
    assert data["skipped"][0]["file_name"] == "broken.jpg"
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))  # loads as a labelled data set
    assert sorted(coco.getImgIds()) == [1, 2] and len(coco.getAnnIds()) == 96
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == VOCAB
    for ann in data["annotations"]:
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.shape == HW and int(mask.sum()) == ann["area"]
        np.testing.assert_allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])
        assert VOCAB[ann["category_id"] - 1] == ann["category_name"]
    # the annotations list is a COCO results list too
    results = coco.loadRes(data["annotations"])
    assert len(results.getAnnIds()) == 96


def _cli(setup, *extra: str) -> list[str]:
    return [
        "--everything", "true", "--vocab", ",".join(VOCAB), "--head", str(setup["head"]),
        "--sam_type", "tiny", "--sam_checkpoint", str(setup["backbones"]["sam_checkpoint"]),
        "--clip_model", str(setup["backbones"]["clip_dir"]),
        "--text_cache", str(setup["text_cache"]), *FLAGS, *extra,
    ]  # fmt: skip


def test_cli_image_and_folder(setup, tmp_path, capsys):
    out, labels = tmp_path / "everything.png", tmp_path / "one.json"
    image = setup["images"] / "a.png"
    assert main(_cli(setup, "--image", str(image), "--out", str(out), "--json", str(labels))) == 0
    assert "named 48 regions in 1 images" in capsys.readouterr().out
    data = json.loads(labels.read_text())
    assert data["images"] == [{"id": 1, "file_name": "a.png", "width": HW[1], "height": HW[0]}]
    assert data["info"]["generator"]["points_per_side"] == 4
    with Image.open(out) as picture:
        assert picture.size == (HW[1] * 4, HW[0] * 4)

    pictures, folder_json = tmp_path / "pictures", tmp_path / "all.json"
    args = _cli(setup, "--images", str(setup["images"]), "--out", str(pictures),
                "--json", str(folder_json), "--score_thresh", "0.3")  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "name everything" in captured.err  # the progress bar
    data = json.loads(folder_json.read_text())
    assert {i["id"]: i["file_name"] for i in data["images"]} == {1: "a.png", 2: "b.jpg"}
    assert all(a["score"] >= 0.3 for a in data["annotations"])
    assert sorted(p.name for p in pictures.iterdir()) == ["a.png", "b.png"]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    kept_everywhere = json.loads(labels.read_text())["annotations"]  # a.png at threshold 0
    assert len([a for a in data["annotations"] if a["image_id"] == 1]) == sum(
        a["score"] >= 0.3 for a in kept_everywhere
    )


def test_cli_everything_bad_input(setup, tmp_path, capsys):
    image, js = str(setup["images"] / "a.png"), str(tmp_path / "o.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--image", image, "--out", "o.png", "--json", js, "--boxes", "1,1,5,5"],
         "--boxes does not go with --everything"),
        (["--image", image, "--out", "o.png"], "--everything needs --json"),
        (["--image", image, "--images", str(tmp_path), "--json", js], "one of --image IMG or --images"),
        (["--images", str(empty), "--json", js], "no images (.jpg"),
        (["--images", str(tmp_path / "nope"), "--json", js], "image folder not found"),
        (["--image", image, "--out", "o.png", "--json", js, "--generator.pred_iou_thresh", "2"],
         "--generator.pred_iou_thresh is 2.0; it must be in [0, 1]"),
        (["--image", image, "--out", "o.png", "--json", js, "--score_thresh", "-1"],
         "--score_thresh is -1.0; it must be in [0, 1]"),
        (["--image", str(tmp_path / "missing.png"), "--out", "o.png", "--json", js],
         "image file not found"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(_cli(setup, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o.json").exists()


def test_mask_box_matches_pycocotools():
    mask = np.zeros((20, 30), np.uint8)
    mask[3:9, 5:6] = 1  # one column wide: SAM's box has w = 0
    rle = mask_utils.encode(np.asfortranarray(mask))
    x1, y1, x2, y2 = mask_box([5, 3, 0, 5])
    np.testing.assert_allclose(mask_utils.toBbox(rle), [x1, y1, x2 - x1, y2 - y1])
