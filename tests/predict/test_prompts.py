"""Point and box prompts: SAM's own tokens, masks and IoUs (SamPredictor), multimask, region
embeddings, and clear errors for bad prompts, in Python and on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from segment_anything import SamPredictor
from tolerances import assert_close_across_batching, assert_masks_agree

from regionspot_pl.backbones.clip import text_embeddings
from regionspot_pl.backbones.image import masks_to_original, resize_for_backbones
from regionspot_pl.model import region_logits
from regionspot_pl.predict.cli import main
from regionspot_pl.predict.predictor import Predictor
from regionspot_pl.predict.prompts import region_prompts
from regionspot_pl.predict.run import parse_points

VOCAB = ["red circle", "blue square", "green triangle", "background"]
HW = (150, 220)  # non-square, so that x and y scale differently into the resized image


def scene(height: int = HW[0], width: int = HW[1]) -> np.ndarray:
    """A small picture with three shapes: HxWx3 uint8."""
    image = Image.new("RGB", (width, height), (200, 190, 170))
    draw = ImageDraw.Draw(image)
    draw.ellipse([20, 20, 80, 80], fill=(220, 30, 30))
    draw.rectangle([120, 30, 200, 110], fill=(30, 60, 220))
    draw.polygon([(40, 140), (90, 95), (110, 145)], fill=(40, 180, 60))
    return np.asarray(image).copy()


@pytest.fixture(scope="module")
def setup(tiny_backbones, tiny_head, predictor, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prompts")
    image = scene()
    Image.fromarray(image).save(root / "scene.png")
    predictor.set_image(image)
    return {"root": root, "head": tiny_head["folder"], "predictor": predictor, "image": image,
            "backbones": tiny_backbones}  # fmt: skip


def sam_reference(predictor: Predictor, image: np.ndarray, multimask: bool = False, **prompt):
    """segment-anything's SamPredictor on the image the predictor's SAM sees (the resized one),
    one region's prompt scaled into it: (hs [T, 256], masks at the original size, iou)."""
    resized = resize_for_backbones(image)
    (height, width), (h, w) = image.shape[:2], resized.shape[:2]
    reference = SamPredictor(predictor.encoder.segmenter.sam)
    reference.set_image(resized)
    scaled = {}
    if "point_coords" in prompt:
        scaled["point_coords"] = np.asarray(prompt["point_coords"], float) * [w / width, h / height]
        scaled["point_labels"] = np.asarray(prompt["point_labels"])
    if "box" in prompt:
        scaled["box"] = np.asarray(prompt["box"], float) * [w / width, h / height, w / width, h / height]
    captured = []
    transformer = predictor.encoder.segmenter.sam.mask_decoder.transformer
    hook = transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        masks, iou, _ = reference.predict(**scaled, multimask_output=multimask)
    finally:
        hook.remove()
    masks = masks_to_original(torch.from_numpy(masks), (height, width))
    return captured[0][0], masks, torch.from_numpy(iou)


def assert_tokens_equal(ours: torch.Tensor, sam_tokens: torch.Tensor) -> None:
    """The predictor rounds SAM tokens through float16, as the feature cache stores them."""
    torch.testing.assert_close(ours, sam_tokens.half().float(), rtol=1e-3, atol=1e-3)


def assert_masks_equal(ours, reference: torch.Tensor) -> None:
    ours = torch.as_tensor(np.asarray(ours))
    assert ours.shape == reference.shape
    assert reference.any()  # not vacuous
    # pixels whose logit sits on SAM's threshold may flip with float rounding: allow 0.1%
    assert (ours != reference).float().mean() < 1e-3


def tokens_of(predictor: Predictor, multimask: bool = False, **prompts):
    regions = region_prompts(prompts.get("boxes"), prompts.get("point_coords"),
                             prompts.get("point_labels"), predictor.image_size)  # fmt: skip
    return predictor._prompt_tokens(regions, multimask)


def test_point_prompts_give_sam_predictors_tokens_masks_and_iou(setup):
    predictor, image = setup["predictor"], setup["image"]
    coords = [[[50.0, 50.0], [150.0, 60.0]], [[160.5, 70.25], [5.0, 140.0]]]
    labels = [[1, 0], [1, 1]]
    tokens, masks, iou = tokens_of(predictor, point_coords=coords, point_labels=labels)
    assert tokens.shape == (2, 256) and masks.shape == (2, *HW) and iou.shape == (2,)
    results = predictor.predict(vocabulary=VOCAB, point_coords=coords, point_labels=labels)
    for r in range(2):
        hs, ref_masks, ref_iou = sam_reference(predictor, image, point_coords=coords[r], point_labels=labels[r])
        assert_tokens_equal(tokens[r], hs[1])  # hs[:, 1]: the single-mask output's token
        assert_masks_equal(results[r]["mask"], ref_masks[0])
        assert results[r]["iou"] == pytest.approx(float(ref_iou[0]), abs=1e-4)
        assert results[r]["box"] is None
        assert results[r]["point_coords"] == coords[r] and results[r]["point_labels"] == labels[r]


def test_box_with_points_is_one_sam_prompt(setup):
    predictor, image = setup["predictor"], setup["image"]
    box, coords, labels = [110.0, 20.0, 210.0, 120.0], [[160.0, 70.0], [115.0, 25.0]], [1, 0]
    tokens, masks, iou = tokens_of(predictor, boxes=[box], point_coords=[coords], point_labels=[labels])
    hs, ref_masks, ref_iou = sam_reference(predictor, image, box=box, point_coords=coords, point_labels=labels)
    assert_tokens_equal(tokens[0], hs[1])
    assert_masks_equal(masks[0].cpu(), ref_masks[0])
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-4)
    # a 2-D [K, 2] array is one region of K points, as SamPredictor.predict takes it
    single = tokens_of(predictor, boxes=[box], point_coords=np.array(coords), point_labels=labels)
    torch.testing.assert_close(single[0], tokens, rtol=0, atol=0)


def test_box_prompts_unchanged_by_the_prompt_path(setup):
    predictor, image = setup["predictor"], setup["image"]
    boxes = [[10.0, 10.0, 90.0, 90.0], [115.5, 25.0, 205.0, 115.0]]
    tokens, masks, _ = tokens_of(predictor, boxes=boxes)
    for i, box in enumerate(boxes):
        hs, ref_masks, _ = sam_reference(predictor, image, box=box)
        assert_tokens_equal(tokens[i], hs[1])
        assert_masks_equal(masks[i].cpu(), ref_masks[0])


def test_multimask_names_the_three_sam_masks(setup):
    predictor, image = setup["predictor"], setup["image"]
    coords, labels = [[[50.0, 50.0]], [[160.0, 70.0]]], [[1], [1]]
    tokens, masks, iou = tokens_of(predictor, True, point_coords=coords, point_labels=labels)
    assert tokens.shape == (2, 3, 256) and masks.shape == (2, 3, *HW) and iou.shape == (2, 3)
    results = predictor.predict(vocabulary=VOCAB, topk=len(VOCAB), point_coords=coords,
                                point_labels=labels, multimask_output=True)  # fmt: skip
    texts = text_embeddings(predictor.encoder.vlm, VOCAB, predictor.text_cache, predictor.clip_id)
    for r in range(2):
        hs, ref_masks, ref_iou = sam_reference(
            predictor, image, multimask=True, point_coords=coords[r], point_labels=labels[r]
        )
        assert_tokens_equal(tokens[r], hs[2:5])  # the tokens of mask outputs 1..3
        assert results[r]["masks"].shape == (3, *HW)
        for j in range(3):
            assert_masks_equal(results[r]["masks"][j], ref_masks[j])
        np.testing.assert_allclose(results[r]["iou"], ref_iou.numpy(), atol=1e-4)
    # candidate j of every region is named by one head pass over the N tokens of index j
    for j in range(3):
        with torch.no_grad():
            emb = predictor.head(tokens[:, j][None], predictor._features.image_tokens.float()[None])[0]
        probs = region_logits(emb, texts).softmax(-1)
        for r in range(2):
            got = [results[r]["scores"][j][results[r]["labels"][j].index(n)] for n in VOCAB]
            np.testing.assert_allclose(got, probs[r].numpy(), atol=1e-5)


def decoder_reduction_length(predictor: Predictor) -> int:
    """The longest sum in SAM's mask decoder: its MLP's hidden width (2048 in every SAM)."""
    return predictor.encoder.segmenter.sam.mask_decoder.transformer.layers[0].mlp.lin1.out_features


def test_regions_with_different_point_counts_keep_their_order(setup):
    predictor = setup["predictor"]
    coords = [[[50.0, 50.0]], [[160.0, 70.0], [30.0, 130.0], [200.0, 140.0]], [[70.0, 120.0]]]
    labels = [[1], [1, 0, 0], [1]]
    tokens, masks, iou = tokens_of(predictor, point_coords=coords, point_labels=labels)
    k = decoder_reduction_length(predictor)
    for r in range(3):  # each alone (a decoder batch of 1, not 2): the same as in the mixed batch
        alone = tokens_of(predictor, point_coords=[coords[r]], point_labels=[labels[r]])
        assert_close_across_batching(tokens[r], alone[0][0], k, float16_rounded=True)
        assert_masks_agree(masks[r], alone[1][0])
        assert alone[1][0].any()  # not vacuous
    results = predictor.predict(vocabulary=VOCAB, point_coords=coords, point_labels=labels)
    assert [r["point_coords"] for r in results] == coords
    # default labels: every point foreground
    default = tokens_of(predictor, point_coords=[coords[0], coords[2]])
    assert_close_across_batching(default[0], tokens[[0, 2]], k, float16_rounded=True)
    # a swapped order is far outside those tolerances
    assert not torch.allclose(tokens[0], tokens[2], rtol=1e-2, atol=1e-2)


def test_region_embeddings_are_the_predictors_embeddings(setup):
    predictor = setup["predictor"]
    boxes = [[10.0, 10.0, 90.0, 90.0], [115.0, 25.0, 205.0, 115.0]]
    coords, labels = [[[50.0, 50.0]], [[160.0, 70.0]]], [[1], [1]]
    emb = predictor.region_embeddings(boxes, point_coords=coords, point_labels=labels)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    texts = text_embeddings(predictor.encoder.vlm, VOCAB, predictor.text_cache, predictor.clip_id)
    probs = (100 * emb @ torch.nn.functional.normalize(texts, dim=-1).T).softmax(-1)
    results = predictor.predict(boxes, VOCAB, topk=len(VOCAB), point_coords=coords,
                                point_labels=labels)  # fmt: skip
    for r, result in enumerate(results):
        got = [result["scores"][result["labels"].index(n)] for n in VOCAB]
        np.testing.assert_allclose(got, probs[r].numpy(), atol=1e-5)
    multi = predictor.region_embeddings(point_coords=coords, point_labels=labels, multimask_output=True)
    assert multi.shape == (2, 3, 64)
    assert predictor.region_embeddings([]).shape == (0, 64)
    # predict's return_embeddings: the same rows from its own pass (same inputs, same arithmetic)
    named = predictor.predict(boxes, VOCAB, point_coords=coords, point_labels=labels, return_embeddings=True)
    torch.testing.assert_close(torch.from_numpy(np.stack([r["embedding"] for r in named])), emb, rtol=0, atol=0)
    named = predictor.predict(None, VOCAB, point_coords=coords, point_labels=labels, multimask_output=True,
                              return_embeddings=True)  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(np.stack([r["embedding"] for r in named])), multi, rtol=0, atol=0)
    assert "embedding" not in results[0]


def test_bad_prompts_are_refused_with_what_is_wrong(setup):
    predictor = setup["predictor"]
    h, w = HW
    cases = [
        ({"point_coords": [[[10, 10], [w + 5, 20]]]},
         rf"point 1 of region 0 \(x={w + 5}, y=20\) is outside the image of {w}x{h}"),
        ({"point_coords": [[[10, 10]]], "point_labels": [[2]]},
         r"point_labels of region 0 hold 2; a label is 1 \(foreground\) or 0 \(background\)"),
        ({"point_coords": [[10, 10, 3]]}, r"point_coords must be \[K, 2\] x, y"),
        ({"point_coords": [[[10, 10], [20, 20]]], "point_labels": [[1]]},
         "region 0 has 2 points but 1 point_labels"),
        ({"point_coords": [[[10, np.nan]]]}, "non-finite"),
        ({"boxes": [[0, 0, 10, 10], [5, 5, 20, 20]], "point_coords": [[[1, 1]]]},
         "2 boxes but 1 point prompts"),
        ({"point_labels": [[1]]}, "point_labels given without point_coords"),
    ]  # fmt: skip
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            predictor.predict(prompt.pop("boxes", None), VOCAB, **prompt)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        predictor.predict(point_coords=[[[10, 10]]], vocabulary=[])
    assert predictor.predict(vocabulary=VOCAB) == []  # no regions, no work
    fresh = Predictor(predictor.head, predictor.encoder, predictor.clip_id)
    with pytest.raises(RuntimeError, match="no image set"):
        fresh.region_embeddings(point_coords=[[[1, 1]]])


def test_parse_points_groups_regions_by_semicolon():
    coords, labels = parse_points("10,20; 30, 40 50,60,0 ;70,80,1;")
    assert coords == [[[10, 20]], [[30, 40], [50, 60]], [[70, 80]]]
    assert labels == [[1], [1, 0], [1]]
    for text, message in [
        ("10,20,1,4", r"--points region 0 point 0 '10,20,1,4' is not x,y or x,y,label"),
        ("10,20;a,b", "region 1 point 0 'a,b' is not x,y"),
        ("10,20 30,40,2", "region 0 point 1 '30,40,2': label must be 1 .* or 0 .*, got 2"),
        (" ; ", "--points is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_points(text)


def _cli(setup, *extra: str) -> list[str]:
    return [
        "--image", str(setup["root"] / "scene.png"), "--vocab", ",".join(VOCAB),
        "--head", str(setup["head"]), "--sam_type", "tiny",
        "--sam_checkpoint", str(setup["backbones"]["sam_checkpoint"]),
        "--clip_model", str(setup["backbones"]["clip_dir"]),
        "--text_cache", str(setup["predictor"].text_cache), "--topk", "2", *extra,
    ]  # fmt: skip


def test_cli_points_boxes_and_multimask(setup, tmp_path, capsys):
    out = tmp_path / "points.png"
    args = _cli(setup, "--points", "50,50;160,70 115,25,0", "--out", str(out),
                "--attention_out", str(tmp_path / "attn.png"))  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["point_coords"] for p in printed] == [[[50, 50]], [[160, 70], [115, 25]]]
    assert [p["point_labels"] for p in printed] == [[1], [1, 0]]
    assert "box" not in printed[0] and len(printed[0]["labels"]) == 2
    with Image.open(out) as im:
        assert im.size == (HW[1] * 3, HW[0] * 3)  # enlarged for readable captions
    assert (tmp_path / "attn.png").is_file()

    both = _cli(setup, "--boxes", "10,10,90,90;110,20,210,120", "--points", "50,50;160,70 115,25,0",
                "--multimask", "true", "--out", str(out))  # fmt: skip
    assert main(both) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[1]["box"] == [110, 20, 210, 120] and printed[1]["point_labels"] == [1, 0]
    assert len(printed[1]["iou"]) == 3 and len(printed[1]["labels"]) == 3
    expected = Predictor.predict(setup["predictor"], [[110, 20, 210, 120]], VOCAB, topk=2,
                                 point_coords=[[[160, 70], [115, 25]]], point_labels=[[1, 0]],
                                 multimask_output=True)[0]  # fmt: skip
    np.testing.assert_allclose(printed[1]["iou"], expected["iou"], atol=1e-6)


def test_cli_bad_prompts_exit_2_with_an_error_line(setup, tmp_path, capsys):
    out = tmp_path / "x.png"
    w = HW[1]
    cases = [
        (["--points", "10,20,5", "--out", str(out)], "label must be 1 (foreground) or 0"),
        (["--points", "10;20,30", "--out", str(out)], "region 0 point 0 '10' is not x,y"),
        (["--points", f"{w + 1},20", "--out", str(out)], "is outside the image of 220x150"),
        (["--boxes", "1,1,9,9;2,2,8,8", "--points", "5,5", "--out", str(out)],
         "2 boxes but 1 point prompts"),
        (["--out", str(out)], "give the regions: --boxes and/or --points"),
        (["--images", str(tmp_path), "--points", "5,5", "--out", str(out)],
         "--images DIR works with --everything"),
        (["--points", "5,5"], "give --out"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main(_cli(setup, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_points_path_in_help():
    from regionspot_pl.predict.cli import COMMAND

    text = COMMAND.parser().format_help()
    assert "--points" in text and "region i is box i" in text and "--everything" in text
