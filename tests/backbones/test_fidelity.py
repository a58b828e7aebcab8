"""The reference's inference path, item by item, against independent computations.

Each test rebuilds one behaviour of RegionSpot's reference (docs/fidelity.md) from the
libraries themselves or from the rule written out by hand, and compares it with this package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import assert_close_across_batching, probability_rtol
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss

from regionspot_pl.backbones.clip import ClipEncoder, load_clip
from regionspot_pl.backbones.image import (
    ImageReadError,
    masks_to_original,
    read_image,
    resize_for_backbones,
    resized_shape,
    resolve_image_path,
    scale_boxes,
)
from regionspot_pl.cache.manifest import FORMAT_VERSION, MANIFEST, PROTOCOL, Manifest
from regionspot_pl.cache.shards import ShardFormatError, iter_samples, list_shards
from regionspot_pl.data.records import load_coco, read_proposals
from regionspot_pl.evaluation.scoring import detections_to_results, score_regions
from regionspot_pl.extract.run import ExtractConfig, run_extraction
from regionspot_pl.model.loss import region_focal_loss

# ------------------------------------------------------------------------------- image path

# (H, W) -> (h, w) of detectron2's ResizeShortestEdge(800, max_size=1333), worked by hand:
# scale = 800 / short side; the long side capped at 1333; int(x + 0.5) rounding.
RESIZE_CASES = {
    (480, 640): (800, 1067),  # 640 * 800/480 = 1066.67
    (427, 640): (800, 1199),  # 1199.06
    (640, 427): (1199, 800),
    (100, 1000): (133, 1333),  # 800 x 8000 capped: 800 * 1333/8000 = 133.3
    (333, 500): (800, 1201),  # 1201.2
    (800, 800): (800, 800),
    (1000, 1500): (800, 1200),
    (612, 612): (800, 800),
    (375, 1000): (500, 1333),  # 800 x 2133.3 capped: 800 * 1333/2133.3 = 499.9 -> 500
}


@pytest.mark.parametrize("size,expected", RESIZE_CASES.items())
def test_resized_shape_is_detectron2s(size, expected):
    assert resized_shape(*size) == expected


def test_resize_for_backbones_is_pil_bilinear():
    image = np.random.default_rng(0).integers(0, 256, (333, 500, 3), dtype=np.uint8)
    resized = resize_for_backbones(image)
    expected = np.asarray(Image.fromarray(image).resize((1201, 800), Image.BILINEAR))
    np.testing.assert_array_equal(resized, expected)
    assert resized.flags.writeable


def test_boxes_scale_into_the_resized_image_and_masks_come_back_nearest():
    boxes = torch.tensor([[10.0, 20.0, 300.0, 200.0]])
    scaled = scale_boxes(boxes, (333, 500), (800, 1201))
    torch.testing.assert_close(
        scaled, torch.tensor([[10 * 1201 / 500, 20 * 800 / 333, 300 * 1201 / 500, 200 * 800 / 333]])
    )
    masks = torch.rand(2, 800, 1201) > 0.5
    up = masks_to_original(masks, (333, 500))
    # nearest neighbour: pixel (y, x) takes the resized pixel floor(y * 800/333), floor(x * 1201/500)
    ys = np.floor(np.arange(333) * 800 / 333).astype(int)
    xs = np.floor(np.arange(500) * 1201 / 500).astype(int)
    np.testing.assert_array_equal(up.numpy(), masks.numpy()[:, ys][:, :, xs])


def _exif_rotated_jpeg(path: Path, width: int = 60, height: int = 40) -> np.ndarray:
    """A JPEG stored width x height whose EXIF says 'rotate 90 CW to display' (orientation 6)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    return pixels


def test_read_image_applies_exif_and_falls_back_to_the_raw_array(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(path)
    oriented, raw = read_image(path)
    assert oriented.shape == (60, 40, 3) and not raw  # displayed upright: 40 wide, 60 high
    assert oriented[0, 20, 0] > 200 and oriented[-1, 20, 0] < 50  # the red half is now on top
    again, raw = read_image(path, (60, 40))
    np.testing.assert_array_equal(again, oriented)
    stored, raw = read_image(path, (40, 60))  # the annotation measured the stored pixels
    assert raw and stored.shape == (40, 60, 3)
    with pytest.raises(ImageReadError, match="record says 50x50"):
        read_image(path, (50, 50))


@pytest.mark.parametrize("mode", ["I;16", "LA", "P", "CMYK", "L"])
def test_read_image_any_pillow_mode(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 1, 64), (16, 1))
    if mode == "I;16":
        image = Image.fromarray((ramp * 65535).astype(np.uint16))
        expected = np.round(ramp * 255)
    else:
        gray = Image.fromarray((ramp * 255).astype(np.uint8))
        image = gray.convert(mode)
        expected = np.asarray(gray.convert("RGB"))[..., 0]
    suffix = ".tif" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"x{suffix}")
    pixels, _ = read_image(tmp_path / f"x{suffix}")
    assert pixels.shape == (16, 64, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels[..., 0], expected, atol=1 if mode != "CMYK" else 3)


def test_image_names_never_leave_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    assert resolve_image_path(tmp_path / "images", "a/b.jpg") == (tmp_path / "images/a/b.jpg").resolve()
    for name in ("../secret.jpg", "/etc/passwd", "a/../../secret.jpg"):
        with pytest.raises(ImageReadError, match="outside the image folder"):
            resolve_image_path(tmp_path / "images", name)
    with pytest.raises(ImageReadError, match="non-empty string"):
        resolve_image_path(tmp_path / "images", None)


# --------------------------------------------------------------------------------- prompts


def test_text_embeddings_are_the_references_81_prompt_average(tiny_backbones):
    """HF CLIP's get_text_features on the reference's prompts, averaged un-normalized then
    L2-normalized; names keep their underscores, only '-other'/'-merged'/'-stuff' go."""
    model, tokenizer = load_clip(tiny_backbones["clip_dir"])
    encoder = ClipEncoder(model, tokenizer)
    names = ["aerosol_can", "wall-other-merged", "tv (television)"]
    got = encoder.encode_texts(names)
    from regionspot_pl.backbones.templates import TEMPLATES

    expected = []
    for name in ["aerosol_can", "wall", "tv (television)"]:
        prompts = [t.format(name) for t in TEMPLATES]
        assert prompts[0] == f"{name}." and len(prompts) == 81
        batch = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(**batch)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        expected.append(F.normalize(feats.mean(0), dim=-1))
    # all prompts in one padded batch against one name's prompts at a time: the same sums in
    # another order; the longest one is the text MLP's hidden layer
    reduction = model.config.text_config.intermediate_size
    assert_close_across_batching(got, torch.stack(expected), reduction)
    # and so the class probabilities of some regions against them
    regions = F.normalize(torch.randn(5, got.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(
        (100 * regions @ got.T).softmax(-1), (100 * regions @ torch.stack(expected).T).softmax(-1),
        rtol=probability_rtol(reduction), atol=0,
    )  # fmt: skip


# --------------------------------------------------------------------------------- scoring


def _reference_rule(logits: torch.Tensor, box_scores: torch.Tensor | None) -> set[tuple[int, int, float]]:
    """The reference's inference_{gt,pred}_box: topk(900) of the softmax, times box score."""
    probs = F.softmax(logits, dim=-1).flatten()
    top_probs, top_idx = torch.topk(probs, min(900, len(probs)))
    boxes, labels = top_idx // logits.shape[1], top_idx % logits.shape[1]
    scores = top_probs if box_scores is None else box_scores[boxes] * top_probs
    keep = torch.argsort(scores, descending=True)[:300]  # what LVIS keeps of them
    return {(int(boxes[i]), int(labels[i]), round(float(scores[i]), 6)) for i in keep}


@pytest.mark.parametrize("num_boxes,num_classes", [(40, 50), (3, 1203), (2, 7)])
def test_score_regions_is_the_references_top900_rule(num_boxes, num_classes):
    gen = torch.Generator().manual_seed(num_boxes)
    logits = torch.randn(num_boxes, num_classes, generator=gen) * 4
    box_scores = torch.rand(num_boxes, generator=gen)
    for proposal in (None, box_scores):
        box_idx, class_idx, scores = score_regions(logits, proposal)
        got = {(int(b), int(c), round(float(s), 6)) for b, c, s in zip(box_idx, class_idx, scores)}
        assert got == _reference_rule(logits, proposal)
        assert (scores[:-1] >= scores[1:]).all()


def test_a_pair_outside_the_900_best_probabilities_never_returns():
    """A box with a high proposal score but low probabilities loses to the 900 first."""
    logits = torch.zeros(11, 100)
    logits[10] = -5.0  # the last box's probabilities are the smallest of all 1,100 pairs
    box_scores = torch.full((11,), 0.01)
    box_scores[10] = 1.0
    box_idx, _, _ = score_regions(logits, box_scores)
    assert 10 not in box_idx.tolist()


def test_mask_results_carry_no_bbox():
    rle = {"size": [4, 4], "counts": "04L4"}
    dets = detections_to_results(
        1, torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.5]), [7], [rle]
    )
    assert set(dets[0]) == {"image_id", "category_id", "segmentation", "score"}
    boxes = detections_to_results(
        1, torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.5]), [7]
    )
    assert boxes[0]["bbox"] == [0.0, 0.0, 2.0, 2.0] and "segmentation" not in boxes[0]


# -------------------------------------------------------------------------------- training


def test_loss_is_reduced_per_image_as_the_reference_does():
    """The reference: loss.mean(1).sum() / num_boxes * N over [B, N, C], i.e. per image the
    focal loss summed over classes and averaged over its boxes, summed over images."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 9, generator=gen)
    labels = torch.randint(0, 9, (3, 5), generator=gen)
    targets = F.one_hot(labels, 9).float()
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2, reduction="none")
    reference = loss.mean(1).sum() / 5 * 5
    torch.testing.assert_close(region_focal_loss(logits, labels), reference)
    # with padding masked: image 0 has 2 real boxes, image 1 all 5, image 2 one
    valid = torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = sum(loss[b][valid[b]].sum(-1).mean() for b in range(3))
    torch.testing.assert_close(region_focal_loss(logits, labels, valid), expected)


# ------------------------------------------------------------------------- proposals files


def _glip_and_coco_files(tmp_path: Path, annotations: Path) -> tuple[Path, Path]:
    gt = json.loads(annotations.read_text())
    gen = np.random.default_rng(0)
    glip, coco = {}, []
    for im in gt["images"][:3]:
        boxes, scores = [], []
        for _ in range(4):
            x1, y1 = gen.integers(0, im["width"] // 2), gen.integers(0, im["height"] // 2)
            x2, y2 = x1 + gen.integers(8, im["width"] // 2), y1 + gen.integers(8, im["height"] // 2)
            boxes.append([float(x1), float(y1), float(x2), float(y2)])
            scores.append(round(float(gen.random()), 4))
            coco.append(
                {
                    "image_id": im["id"],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": scores[-1],
                    "category_id": 1,
                }
            )
        glip[str(im["id"])] = {"boxes": boxes, "scores": scores, "labels": [1] * len(boxes)}
    (tmp_path / "glip.json").write_text(json.dumps(glip))
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return tmp_path / "glip.json", tmp_path / "coco.json"


def test_glip_and_coco_proposal_files_give_the_same_shards(demo_data, tiny_backbones, tmp_path):
    glip, coco = _glip_and_coco_files(tmp_path, Path(demo_data["val_json"]))
    assert read_proposals(glip) == read_proposals(coco)
    folders = {}
    for name, path in (("glip", glip), ("coco", coco)):
        folders[name] = tmp_path / name
        run_extraction(
            ExtractConfig(
                images=str(demo_data["val_images"]),
                annotations=str(demo_data["val_json"]),
                out=str(folders[name]),
                sam_type="tiny",
                sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
                clip_model=str(tiny_backbones["clip_dir"]),
                dataset="props",
                workers=0,
                boxes=str(path),
                limit=3,
                text_cache=str(tmp_path / "text.h5"),
            )
        )
    a = {s["__key__"]: s for s in iter_samples(list_shards(folders["glip"]))}
    b = {s["__key__"]: s for s in iter_samples(list_shards(folders["coco"]))}
    assert a.keys() == b.keys() and len(a) == 3
    for key in a:
        for member in ("sam", "boxes", "labels", "scores", "clip"):
            np.testing.assert_array_equal(a[key][member], b[key][member])
        assert a[key]["meta"] == b[key]["meta"]
        assert (a[key]["labels"] == -1).all() and len(a[key]["boxes"]) == 4


@pytest.mark.parametrize(
    "content,match",
    [
        ({"1": {"boxes": [[0, 0, 5, 5]]}}, "entry '1' is not"),
        ({"1": {"boxes": [[0, 0, 5]], "scores": [0.5]}}, "has 3 numbers"),
        ({"1": {"boxes": [[0, 0, 5, 5]], "scores": [0.5, 0.2]}}, "1 boxes but 2 scores"),
        ([{"image_id": 1, "bbox": [0, 0, 5]}], "entry 0 .* is not"),
        ([{"bbox": [0, 0, 5, 5]}], "entry 0"),
    ],
)
def test_malformed_proposal_files_name_the_entry(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        read_proposals(path)


def test_a_gt_image_without_boxes_is_prompted_with_the_whole_image(tmp_path):
    gt = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 30, "height": 20},
        ],
        "categories": [{"id": 5, "name": "cat"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 10]}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    records, _, stats = load_coco(path)
    assert records[1].boxes.tolist() == [[0.0, 0.0, 30.0, 20.0]]
    assert records[1].labels.tolist() == [-1] and records[1].scores.tolist() == [1.0]
    assert stats.whole_image_prompts == 1 and len(records[0].boxes) == 1


# ------------------------------------------------------------------------------- protocol


def test_shards_of_another_protocol_are_refused(demo_shards, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((demo_shards["val"] / MANIFEST).read_text())
    assert manifest["protocol"] == PROTOCOL
    del manifest["protocol"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="re-extract"):
        Manifest.read(old)
    manifest["protocol"] = "something-else"
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"something-else.*re-extract"):
        Manifest.read(old)


@pytest.mark.parametrize(
    ("version", "message"),
    [(FORMAT_VERSION + 1, "newer.*upgrade regionspot_pl"), (0, "re-extract"), (None, "re-extract")],
)
def test_manifests_of_another_format_version_are_refused(demo_shards, tmp_path, version, message):
    manifest = json.loads((demo_shards["val"] / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(ShardFormatError, match=message):
        Manifest.read(tmp_path)


def test_manifest_round_trips_and_types_every_field(demo_shards, tmp_path):
    manifest = Manifest.read(demo_shards["val"])
    assert manifest.clip.vision_dim == 128 and manifest.clip.text_dim == 64 and manifest.sam.type == "tiny"
    raw = json.loads((demo_shards["val"] / MANIFEST).read_text())
    assert manifest.to_dict() == raw
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    raw["backbones"]["clip"]["vision_dim"] = "128"
    with pytest.raises(ShardFormatError, match="backbones.clip.vision_dim"):
        Manifest.from_dict(raw, tmp_path / MANIFEST)


def test_nearest_upsampling_matches_math():
    """masks_to_original keeps a mask that fills the resized image full, and a one-pixel-wide
    band maps to about one original pixel."""
    masks = torch.zeros(1, 800, 1067, dtype=torch.bool)
    masks[:, :, 532:535] = True
    up = masks_to_original(masks, (480, 640))
    cols = up[0].any(0).nonzero().flatten().tolist()
    assert cols and all(math.floor(c * 1067 / 640) in (532, 533, 534) for c in cols)


def test_masks_only_where_they_are_used_and_o365_is_v1():
    """Training sets store no masks (training reads tokens, boxes, labels); evaluation splits do."""
    from regionspot_pl.extract.cli import COMMAND

    for name in ("o365", "openimages", "v3det"):
        assert COMMAND.parse(["--preset", name]).masks is False
    for name in ("lvis_val", "coco"):
        assert COMMAND.parse(["--preset", name]).masks is True
    assert COMMAND.parse(["--preset", "o365"]).annotations.endswith("/objects365_train.json")


def test_images_cross_to_the_device_as_uint8(demo_data, tiny_backbones, tmp_path):
    """Loader workers hand over the resized image and SAM's resize as uint8; normalising and
    padding happen on the device and give SamPredictor's input."""
    from segment_anything import SamPredictor

    from regionspot_pl.extract.features import ImageFeaturesInput
    from regionspot_pl.extract.run import load_extractor

    cfg = ExtractConfig(
        images=str(demo_data["val_images"]),
        annotations=str(demo_data["val_json"]),
        out=str(tmp_path / "x"),
        sam_type="tiny",
        sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
        clip_model=str(tiny_backbones["clip_dir"]),
        workers=0,
    )
    extractor = load_extractor(cfg)
    records, _, _ = load_coco(demo_data["val_json"])
    encoder = extractor.encoder
    inputs = ImageFeaturesInput([(0, records[0])], cfg.images, encoder.segmenter.transform)[0]["input"]
    assert inputs.segmenter_image.dtype == inputs.vlm_image.dtype == torch.uint8
    resized = inputs.vlm_image.permute(1, 2, 0).numpy()
    assert inputs.resized_size == resized.shape[:2] == resized_shape(records[0].height, records[0].width)
    assert inputs.original_size == (records[0].height, records[0].width)
    predictor = SamPredictor(encoder.segmenter.sam)
    expected = encoder.segmenter.sam.preprocess(
        torch.as_tensor(predictor.transform.apply_image(resized)).permute(2, 0, 1)[None].float()
    )
    torch.testing.assert_close(encoder.segmenter_batch([inputs]), expected)
