"""SAM 2.1 behind the promptable-segmenter seam, against sam2's own paths: ``build_sam2`` for the
model, ``SAM2ImagePredictor`` (``set_image`` + ``predict``) for the input, features, masks and
IoUs, and the mask decoder's own ``sam_tokens_out`` for the region token. On the tiny random
SAM 2.1 of ``regionspot_pl.tiny`` (a real ``SAM2Base`` built by Hydra from its YAML)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from tolerances import assert_close_across_batching, assert_masks_agree

from regionspot_pl.backbones import (
    ClipEncoder,
    Prompts,
    RegionEncoder,
    Sam2Segmenter,
    build_sam2_model,
    check_sam_type,
    load_clip,
    load_segmenter,
)
from regionspot_pl.backbones.common import BackboneError
from regionspot_pl.backbones.sam2_model import IMAGE_POSTPROCESSING
from regionspot_pl.utils.checks import SettingError

IMAGE_HW = (150, 220)  # non-square: SAM 2 stretches it to its square input
BOXES = torch.tensor([[10.0, 20.0, 100.0, 120.0], [0.0, 0.0, 219.0, 149.0], [150.5, 30.25, 170.0, 60.0], [5, 5, 8, 9]])
POINTS = torch.tensor([[[50.0, 60.0], [20.0, 30.0]], [[100.0, 20.0], [200.0, 140.0]], [[160.0, 40.0], [7.0, 7.0]]])
POINT_LABELS = torch.tensor([[1, 0], [1, 1], [1, 0]], dtype=torch.int)


@pytest.fixture(scope="module")
def model(tiny_backbones):
    return build_sam2_model(str(tiny_backbones["sam2_config"]), tiny_backbones["sam2_checkpoint"])


@pytest.fixture(scope="module")
def segmenter(model):
    return Sam2Segmenter(model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)
    img[30:100, 40:120] = (200, 30, 30)  # a flat object, so masks are not pure noise
    return img


@pytest.fixture(scope="module")
def embedding(segmenter, image) -> torch.Tensor:
    return segmenter.encode_images(segmenter.transform(image)[None])


def _decoder_reduction(model) -> int:
    """The longest sum in SAM 2's mask decoder: its two-way transformer's MLP width (2048)."""
    return model.sam_mask_decoder.transformer.layers[0].mlp.layers[0].out_features


def _predict(model, image, **prompts):
    """sam2's own path: ``SAM2ImagePredictor.set_image`` + ``predict``, numpy prompts in pixels;
    the image encoder's input and the mask decoder's ``sam_tokens_out`` captured by hooks.
    Returns (input [3, S, S], features dict, tokens, masks bool, iou) as torch tensors."""
    predictor, seen = SAM2ImagePredictor(model), {}
    pre = model.image_encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    hook = model.sam_mask_decoder.register_forward_hook(lambda m, args, out: seen.update(tokens=out[2]))
    try:
        predictor.set_image(image)
        masks, iou, _ = predictor.predict(**{k: v.numpy() for k, v in prompts.items()}, multimask_output=False)
    finally:
        pre.remove()
        hook.remove()
    return seen["x"][0], predictor._features, seen["tokens"][:, 0], torch.from_numpy(masks > 0), torch.from_numpy(iou)


def _assert_decoded_equal(decoded, tokens, masks, iou, model) -> None:
    """One decode against the predictor's outputs for the same prompts (one decoder call each)."""
    assert_close_across_batching(decoded.tokens, tokens, _decoder_reduction(model))
    assert_close_across_batching(decoded.iou, iou.reshape(decoded.iou.shape), _decoder_reduction(model))
    assert_masks_agree(decoded.masks, masks.reshape(decoded.masks.shape))
    assert decoded.masks.any() and not decoded.masks.all()  # the comparison is not vacuous


# ------------------------------------------------------------------------------------ model


def test_packaged_type_is_built_as_build_sam2_builds_it():
    """Random hiera-t both ways: the same modules, parameter shapes and image post-processing."""
    ours = build_sam2_model("sam2.1_hiera_t", None)
    theirs = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")
    assert repr(ours) == repr(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for key in IMAGE_POSTPROCESSING:
        assert getattr(ours.sam_mask_decoder, key) == getattr(theirs.sam_mask_decoder, key)
    assert ours.sam_mask_decoder.dynamic_multimask_via_stability is True
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def test_tiny_sam2_is_a_frozen_sam2base(model, segmenter, tiny_backbones):
    assert isinstance(model, SAM2Base) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 8e6
    assert segmenter.image_size == 1024 and segmenter.token_dim == 256
    assert tiny_backbones["sam2_config"].read_text().startswith("# @package _global_\n")
    assert isinstance(
        load_segmenter(str(tiny_backbones["sam2_config"]), tiny_backbones["sam2_checkpoint"]), Sam2Segmenter
    )


# ------------------------------------------------------------------------- against the predictor


def test_boxes_match_sam2_image_predictor(model, segmenter, image, embedding):
    ref_input, ref_features, ref_tokens, ref_masks, ref_iou = _predict(model, image, box=BOXES)

    x = segmenter.transform(image)
    assert x.shape == (3, 1024, 1024) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref_input, rtol=0, atol=0)
    assert segmenter.transform.resize(image).shape == (3, *IMAGE_HW)  # SAM 2 resizes on the device

    image_embed, (feat_s0, feat_s1) = segmenter._prepare(embedding)
    torch.testing.assert_close(image_embed, ref_features["image_embed"])
    torch.testing.assert_close(feat_s0, ref_features["high_res_feats"][0])
    torch.testing.assert_close(feat_s1, ref_features["high_res_feats"][1])

    decoded = segmenter.decode(embedding, [Prompts(boxes=BOXES)], [IMAGE_HW])[0]
    assert decoded.tokens.shape == (4, 256) and decoded.tokens.dtype == torch.float32
    assert decoded.masks.shape == (4, *IMAGE_HW) and decoded.masks.dtype == torch.bool
    assert decoded.iou.shape == (4,) and decoded.iou.dtype == torch.float32
    _assert_decoded_equal(decoded, ref_tokens, ref_masks, ref_iou, model)


def test_token_is_the_first_mask_tokens_output(model, segmenter, embedding):
    """SAM 2's decoder tokens are [object score, IoU, mask 0..3]: the region token is hs[:, 2]."""
    seen = {}
    hook = model.sam_mask_decoder.transformer.register_forward_hook(lambda m, a, out: seen.update(hs=out[0]))
    try:
        decoded = segmenter.decode(embedding, [Prompts(boxes=BOXES)], [IMAGE_HW], with_masks=False)[0]
    finally:
        hook.remove()
    assert model.sam_mask_decoder.pred_obj_scores
    torch.testing.assert_close(decoded.tokens, seen["hs"][:, 2], rtol=0, atol=0)
    assert decoded.masks is None


@pytest.mark.parametrize("with_box", [False, True], ids=["points", "box+points"])
def test_points_match_sam2_image_predictor(model, segmenter, image, embedding, with_box):
    prompts = {"point_coords": POINTS, "point_labels": POINT_LABELS, **({"box": BOXES[:3]} if with_box else {})}
    _, _, ref_tokens, ref_masks, ref_iou = _predict(model, image, **prompts)
    region = Prompts(BOXES[:3] if with_box else None, POINTS, POINT_LABELS)
    decoded = segmenter.decode(embedding, [region], [IMAGE_HW])[0]
    assert decoded.tokens.shape == (3, 256) and decoded.masks.shape == (3, *IMAGE_HW)
    _assert_decoded_equal(decoded, ref_tokens, ref_masks, ref_iou, model)


def test_multimask_points_give_three_tokens_masks_and_ious(model, segmenter, image, embedding):
    predictor, seen = SAM2ImagePredictor(model), {}
    predictor.set_image(image)
    hook = model.sam_mask_decoder.register_forward_hook(lambda m, args, out: seen.update(tokens=out[2]))
    try:
        masks, iou, _ = predictor.predict(POINTS.numpy(), POINT_LABELS.numpy(), multimask_output=True)
    finally:
        hook.remove()
    decoded = segmenter.decode(embedding, [Prompts(None, POINTS, POINT_LABELS)], [IMAGE_HW], multimask_output=True)[0]
    assert decoded.tokens.shape == (3, 3, 256) and decoded.masks.shape == (3, 3, *IMAGE_HW)
    assert decoded.iou.shape == (3, 3)
    _assert_decoded_equal(decoded, seen["tokens"], torch.from_numpy(masks > 0), torch.from_numpy(iou), model)


# ---------------------------------------------------------------------------------- batching


def test_batched_boxes_equal_one_box_at_a_time(model, segmenter, embedding):
    calls = []
    hook = model.sam_mask_decoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        whole = segmenter.decode(embedding, [Prompts(boxes=BOXES)], [IMAGE_HW])[0]
        assert len(calls) == 1  # all boxes of the image in one decoder call
        chunked = segmenter.decode(embedding, [Prompts(boxes=BOXES)], [IMAGE_HW], max_prompts_per_call=3)[0]
        assert len(calls) == 3
    finally:
        hook.remove()
    single = [segmenter.decode(embedding, [Prompts(boxes=box[None])], [IMAGE_HW])[0] for box in BOXES]
    one_by_one = {name: torch.cat([getattr(d, name) for d in single]) for name in ("tokens", "masks", "iou")}
    for name, other in (("chunks of 3 and 1", vars(chunked)), ("one box a call", one_by_one)):
        assert_close_across_batching(other["tokens"], whole.tokens, _decoder_reduction(model)), name
        assert_close_across_batching(other["iou"], whole.iou, _decoder_reduction(model))
        assert_masks_agree(other["masks"], whole.masks)


def test_prompts_of_several_images_equal_each_images_own_decode(model, segmenter, image, embedding):
    """Boxes of two images (and one image without boxes) in calls that straddle images."""
    other = np.ascontiguousarray(image[::-1, ::-1])
    embeddings = torch.cat([embedding, segmenter.encode_images(segmenter.transform(other)[None]), embedding])
    prompts = [Prompts(boxes=BOXES[:3]), Prompts(boxes=BOXES), Prompts(boxes=torch.zeros(0, 4))]
    sizes = [IMAGE_HW, IMAGE_HW, (80, 90)]
    for per_call in (256, 3):
        batched = segmenter.decode(embeddings, prompts, sizes, max_prompts_per_call=per_call)
        for i, decoded in enumerate(batched):
            expected = segmenter.decode(embeddings[i : i + 1], prompts[i : i + 1], sizes[i : i + 1])[0]
            assert decoded.tokens.shape == expected.tokens.shape == (len(prompts[i]), 256)
            assert decoded.masks.shape == expected.masks.shape == (len(prompts[i]), *sizes[i])
            if len(prompts[i]):
                assert_close_across_batching(decoded.tokens, expected.tokens, _decoder_reduction(model))
                assert_close_across_batching(decoded.iou, expected.iou, _decoder_reduction(model))
                assert_masks_agree(decoded.masks, expected.masks)
    # image 0 and image 1 differ: a prompt decoded against the wrong image would not pass
    first = segmenter.decode(embeddings[:2], [Prompts(boxes=BOXES[:1])] * 2, [IMAGE_HW] * 2)
    assert (first[0].tokens - first[1].tokens).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ errors


def _sam2_error(tmp_path: Path, sam_type: str, state, match: str, error=BackboneError) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    with pytest.raises(error, match=match):
        build_sam2_model(sam_type, path)


def test_checkpoint_errors_name_the_file_the_type_and_the_fix(tmp_path, tiny_backbones):
    tiny_yaml = str(tiny_backbones["sam2_config"])
    with pytest.raises(
        FileNotFoundError, match=r"(?s)nope\.pt.*sam2\.1_hiera_t.*sam2\.1_hiera_tiny\.pt.*--sam_checkpoint"
    ):
        build_sam2_model("sam2.1_hiera_t", tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="trained with sam2.1_hiera_tiny_random.yaml"):
        build_sam2_model(tiny_yaml, tmp_path / "nope.pt")
    # not a SAM 2 checkpoint: another dict, and a SAM (segment-anything) state dict
    _sam2_error(tmp_path, tiny_yaml, {"weight": torch.zeros(2)}, "checkpoint.pt.*is not a SAM 2 checkpoint")
    sam1 = torch.load(tiny_backbones["sam_checkpoint"], weights_only=True)
    _sam2_error(tmp_path, tiny_yaml, sam1, r"SAM \(segment-anything\) state dict: pass its --sam_type")
    # a pickle of more than tensors is refused unread (weights_only=True)
    _sam2_error(tmp_path, tiny_yaml, {"model": {"x": Path("x")}}, "weights-only SAM 2 checkpoint: it pickles objects")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"garbage\.pt.*weights-only SAM 2 checkpoint: not a readable PyTorch file"):
        build_sam2_model(tiny_yaml, garbage)
    # another size: refused from the state dict, before the (possibly large) model is built
    state = torch.load(tiny_backbones["sam2_checkpoint"], weights_only=True)
    _sam2_error(tmp_path, "sam2.1_hiera_t", state, r"\(16, 5\), the config asks for \(96, 12\); it matches no packaged")
    hiera_t_like = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}
    hiera_t_like.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    _sam2_error(tmp_path, "sam2.1_hiera_s", {"model": hiera_t_like}, "it looks like --sam_type sam2.1_hiera_t")
    # the right size with a missing key or a wrong shape: load_state_dict's strict error, reworded
    missing = {"model": {k: v for k, v in state["model"].items() if k != "sam_mask_decoder.iou_token.weight"}}
    _sam2_error(tmp_path, tiny_yaml, missing, "(?s)does not fit --sam_type .*iou_token")
    reshaped = {"model": {**state["model"], "no_mem_embed": torch.zeros(1, 1, 8)}}
    _sam2_error(tmp_path, tiny_yaml, reshaped, "(?s)does not fit --sam_type .*no_mem_embed")


def test_config_errors(tmp_path, tiny_backbones):
    with pytest.raises(FileNotFoundError, match="SAM 2 model config .*none.yaml.* not found"):
        build_sam2_model(str(tmp_path / "none.yaml"), None)
    not_sam2 = tmp_path / "not_sam2.yaml"
    not_sam2.write_text("model:\n  lr: 1\n")
    with pytest.raises(BackboneError, match="not a SAM 2 model config"):
        build_sam2_model(str(not_sam2), None)
    # Hydra would call any _target_: a config naming other code is refused, not run
    foreign = tmp_path / "foreign.yaml"
    text = tiny_backbones["sam2_config"].read_text()
    foreign.write_text(text.replace("sam2.modeling.memory_attention.MemoryAttention", "os.system", 1))
    with pytest.raises(BackboneError, match="'os.system' as a _target_"):
        build_sam2_model(str(foreign), None)
    with pytest.raises(SettingError, match="is 'sam2_hiera_x'; expected one of: vit_b.*sam2.1_hiera_b\\+.*yaml"):
        check_sam_type("sam2_hiera_x")
    with pytest.raises(BackboneError, match="unknown --sam_type"):
        load_segmenter("sam2_hiera_x", None)


# -------------------------------------------------------------------------- the encode path


def test_region_encoder_with_sam2_gives_the_predictors_masks_and_iou(model, tiny_backbones):
    """An image of detectron2's own size (800 x 1024: its resize keeps it) through RegionEncoder:
    tokens, masks at the original size and IoUs of SAM2ImagePredictor on that image."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (800, 1024, 3), dtype=np.uint8)
    image[200:600, 300:700] = (200, 40, 30)
    encoder = RegionEncoder(Sam2Segmenter(model), ClipEncoder(*load_clip(tiny_backbones["clip_dir"])))
    boxes = torch.tensor([[300.0, 200.0, 700.0, 600.0], [10.0, 20.0, 1000.0, 790.0], [512.0, 64.0, 600.0, 128.0]])
    (encoded,) = encoder.encode([encoder.image_input(image)], [Prompts(boxes=boxes)])
    regions = encoded.regions
    assert regions.tokens.shape == (3, 256) and regions.tokens.dtype == torch.float16
    assert regions.masks.shape == (3, 800, 1024) and regions.masks.dtype == torch.bool
    assert regions.iou.shape == (3,) and regions.iou.dtype == torch.float32
    assert encoded.image_tokens.shape == (197, 128) and encoded.image_tokens.dtype == torch.float16
    _, _, tokens, masks, iou = _predict(model, image, box=boxes)
    assert_close_across_batching(regions.tokens, tokens.half(), _decoder_reduction(model), float16_rounded=True)
    assert_close_across_batching(regions.iou, iou[:, 0], _decoder_reduction(model))
    assert_masks_agree(regions.masks, masks[:, 0])


def test_extraction_with_sam2_records_it_in_the_manifest(demo_data, tiny_backbones, tmp_path):
    from regionspot_pl.cache.shards import iter_samples, list_shards
    from regionspot_pl.extract.run import ExtractConfig, run_extraction

    run_extraction(
        ExtractConfig(
            images=str(demo_data["val_images"]), annotations=str(demo_data["val_json"]), out=str(tmp_path / "shards"),
            sam_type=str(tiny_backbones["sam2_config"]), sam_checkpoint=str(tiny_backbones["sam2_checkpoint"]),
            clip_model=str(tiny_backbones["clip_dir"]), workers=0, limit=2, text_cache=str(tmp_path / "text.h5"),
        )
    )  # fmt: skip
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    sam = manifest["backbones"]["sam"]
    assert sam["type"] == "sam2.1_hiera_tiny_random.yaml" and sam["image_size"] == 1024
    assert manifest["config"]["sam_type"] == str(tiny_backbones["sam2_config"])
    samples = list(iter_samples(list_shards(tmp_path / "shards")))
    assert len(samples) == 2 and all(s["sam"].shape == (len(s["boxes"]), 256) for s in samples)
