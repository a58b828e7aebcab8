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
