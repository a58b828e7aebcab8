"""Extraction with a vision-language model other than CLIP (the tiny SigLIP: 256 input, 257
tokens, the pooled token first), and fit reading its shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_fit import tiny_fit_config
from tolerances import F16_EPS, F16_SUBNORMAL_STEP
from transformers import SiglipModel

from regionspot_pl.backbones.image import resize_for_backbones
from regionspot_pl.cache.manifest import Manifest
from regionspot_pl.cache.shards import iter_samples, list_shards
from regionspot_pl.data.records import load_coco
from regionspot_pl.extract.cli import main
from regionspot_pl.fit import run as fit


@pytest.mark.slow
def test_siglip_shards_extract_and_train(demo_data, tiny_backbones, tmp_path):
    siglip = tiny_backbones["siglip_dir"]
    argv = ["--images", demo_data["val_images"], "--annotations", demo_data["val_json"], "--out", tmp_path / "shards"]
    argv += ["--sam_type", "tiny", "--sam_checkpoint", tiny_backbones["sam_checkpoint"], "--clip_model", siglip]
    argv += ["--clip_size", "256", "--workers", "0", "--limit", "2", "--text_cache", tmp_path / "text.h5"]
    assert main([str(a) for a in argv]) == 0

    clip = Manifest.read(tmp_path / "shards").clip
    assert (clip.image_size, clip.tokens, clip.vision_dim, clip.text_dim) == (256, 257, 128, 128)
    samples = list(iter_samples(list_shards(tmp_path / "shards")))
    assert len(samples) == 2 and samples[0]["clip"].shape == (257, 128)
    # the stored map is HF SigLIP's: pooled token, then last_hidden_state, of the square image
    record = next(r for r in load_coco(demo_data["val_json"])[0] if r.image_id == int(samples[0]["meta"]["image_id"]))
    resized = resize_for_backbones(np.array(Image.open(demo_data["val_images"] / record.file_name).convert("RGB")))
    square = torch.nn.functional.interpolate(
        torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255, size=(256, 256), mode="bilinear"
    )
    config = json.loads((siglip / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(config[key]).view(3, 1, 1) for key in ("image_mean", "image_std"))
    hf = SiglipModel.from_pretrained(siglip, local_files_only=True).eval().requires_grad_(False)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=(square - mean) / std)
    expected = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)[0]
    # one float16 rounding of the float32 map (CPU: precision auto is fp32)
    stored = torch.tensor(samples[0]["clip"]).float()
    torch.testing.assert_close(stored, expected, rtol=F16_EPS, atol=F16_SUBNORMAL_STEP)

    summary = fit(tiny_fit_config(tmp_path / "shards", tmp_path / "run", steps=2))
    assert summary["variant"] == "custom"
    head = json.loads((tmp_path / "run" / "head" / "config.json").read_text())
    assert (head["clip_dim"], head["text_dim"]) == (128, 128)
    # SigLIP's own temperature, as the model computes it, in the manifest and the head it trains
    assert clip.logit_scale == head["logit_scale"] == hf.logit_scale.exp().item()
    assert clip.logit_scale == pytest.approx(10.0, rel=1e-6)  # the tiny SigLIP's log 10


def _square(resized: np.ndarray, size: int, folder) -> torch.Tensor:
    """[1, 3, size, size]: the resized image squared without antialias, normalised with the mean and
    std of the folder's preprocessor_config.json (the protocol, computed here independently)."""
    square = torch.nn.functional.interpolate(
        torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255, size=(size, size), mode="bilinear"
    )
    config = json.loads((folder / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(config[key]).view(3, 1, 1) for key in ("image_mean", "image_std"))
    return (square - mean) / std


def _first_sample(demo_data, tiny_backbones, out, sam_type: str, sam_checkpoint, vlm) -> tuple[dict, np.ndarray]:
    """Extract two val images with this pair; the first sample and its image as the backbones see it."""
    argv = ["--images", demo_data["val_images"], "--annotations", demo_data["val_json"], "--out", out / "shards"]
    argv += ["--sam_type", sam_type, "--sam_checkpoint", sam_checkpoint, "--clip_model", vlm]
    assert main([str(a) for a in [*argv, "--workers", "0", "--limit", "2", "--text_cache", out / "text.h5"]]) == 0
    sample = next(iter_samples(list_shards(out / "shards")))
    record = next(r for r in load_coco(demo_data["val_json"])[0] if r.image_id == int(sample["meta"]["image_id"]))
    return sample, resize_for_backbones(np.array(Image.open(demo_data["val_images"] / record.file_name).convert("RGB")))


@pytest.mark.slow
def test_sam2_siglip_shards_hold_sam2s_tokens_masks_iou_and_siglips_map(demo_data, tiny_backbones, tmp_path):
    """The done-when of the pair: tokens are SAM 2.1's sam_tokens_out, masks and IoU are
    SAM2ImagePredictor's on the same resized image (float16 floor), the map is HF SigLIP's."""
    from pycocotools import mask as mask_utils
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from tolerances import assert_close_across_batching, assert_masks_agree
    from transformers import SiglipModel

    from regionspot_pl.backbones.image import masks_to_original
    from regionspot_pl.backbones.sam2_model import build_sam2_model

    config, checkpoint, siglip = (tiny_backbones[k] for k in ("sam2_config", "sam2_checkpoint", "siglip_dir"))
    sample, resized = _first_sample(demo_data, tiny_backbones, tmp_path, str(config), checkpoint, siglip)
    height, width = sample["meta"]["height"], sample["meta"]["width"]
    boxes = sample["boxes"] * np.array([resized.shape[1] / width, resized.shape[0] / height] * 2, np.float32)

    model = build_sam2_model(str(config), checkpoint)
    predictor, seen = SAM2ImagePredictor(model), {}
    hook = model.sam_mask_decoder.register_forward_hook(lambda m, args, out: seen.update(tokens=out[2]))
    predictor.set_image(resized)
    masks, iou, _ = predictor.predict(box=boxes, multimask_output=False)
    hook.remove()
    reduction = model.sam_mask_decoder.transformer.layers[0].mlp.layers[0].out_features
    tokens = torch.as_tensor(sample["sam"]).float()
    assert_close_across_batching(tokens, seen["tokens"][:, 0].half().float(), reduction, float16_rounded=True)
    assert_close_across_batching(torch.as_tensor(sample["iou"]), torch.as_tensor(iou).reshape(-1), reduction)
    stored = torch.from_numpy(mask_utils.decode(sample["meta"]["masks"]).transpose(2, 0, 1).astype(bool))
    expected = masks_to_original(torch.from_numpy(masks.reshape(len(boxes), *masks.shape[-2:]) > 0), (height, width))
    assert_masks_agree(stored, expected)

    hf = SiglipModel.from_pretrained(siglip, local_files_only=True).eval().requires_grad_(False)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=_square(resized, hf.config.vision_config.image_size, siglip))
    expected_map = torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)[0]
    torch.testing.assert_close(
        torch.tensor(sample["clip"]).float(), expected_map, rtol=F16_EPS, atol=F16_SUBNORMAL_STEP
    )


@pytest.mark.slow
def test_sam_metaclip2_shards_hold_metaclip2s_map(demo_data, tiny_backbones, tmp_path):
    """SAM + MetaCLIP 2: the stored map is MetaCLIP 2's vision last_hidden_state (class token first)
    on the protocol's square image (the SAM side is checked against SamPredictor in
    tests/backbones/test_encoder.py, whatever the vision-language model)."""
    from transformers import MetaClip2Model

    metaclip2 = tiny_backbones["metaclip2_dir"]
    sample, resized = _first_sample(
        demo_data, tiny_backbones, tmp_path, "tiny", tiny_backbones["sam_checkpoint"], metaclip2
    )
    hf = MetaClip2Model.from_pretrained(metaclip2, local_files_only=True).eval().requires_grad_(False)
    with torch.no_grad():
        out = hf.vision_model(pixel_values=_square(resized, hf.config.vision_config.image_size, metaclip2))
    stored = torch.tensor(sample["clip"]).float()
    torch.testing.assert_close(stored, out.last_hidden_state[0], rtol=F16_EPS, atol=F16_SUBNORMAL_STEP)
