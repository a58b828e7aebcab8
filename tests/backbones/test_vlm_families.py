"""Every vision-language family (CLIP, MetaCLIP 2, SigLIP) against Hugging Face's own forward of
its tiny random folder, loaded independently with ``AutoModel`` / ``AutoTokenizer``: the feature
map, the text embeddings, the image embeddings, the logit scale; ``load_vlm``'s dispatch and
refusals; the model identity that keys the text cache; the encode path with the tiny SAM."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import F16_EPS, F16_SUBNORMAL_STEP, assert_close_across_batching
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, Siglip2Config

from regionspot_pl.backbones import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEncoder,
    MetaClip2Encoder,
    Prompts,
    RegionEncoder,
    SamSegmenter,
    SiglipEncoder,
    build_sam,
    load_vlm,
    model_identity,
)
from regionspot_pl.backbones.common import BackboneError, BackboneNotFoundError

# fixture key of the tiny folder -> (the class load_vlm gives, image size, vision width, text dim, logit scale)
FAMILIES = {
    "clip_dir": (ClipEncoder, 224, 128, 64, 100.0),
    "metaclip2_dir": (MetaClip2Encoder, 224, 128, 64, 100.0),
    "siglip_dir": (SiglipEncoder, 256, 128, 128, 10.0),
}
TEMPLATES = ["a photo of a {}.", "itap of my {}.", "the {} in a video game."]
NAMES = ["aerosol_can", "traffic light-other"]
CLEANED = ["aerosol_can", "traffic light"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tiny_backbones) -> dict:
    """One family's folder, our model (``load_vlm``) and HF's (``AutoModel``, ``AutoTokenizer``)."""
    folder = tiny_backbones[request.param]
    hf = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    # frozen as ours is: torch's MultiheadAttention (SigLIP's pooling head) picks its fused kernel
    # only for parameters that need no gradient, which rounds differently (~1e-6)
    hf.requires_grad_(False)
    return {
        "key": request.param,
        "folder": folder,
        "vlm": load_vlm(folder),
        "hf": hf,
        "tokenizer": AutoTokenizer.from_pretrained(folder, local_files_only=True),
    }


def _normalisation(folder) -> tuple[list[float], list[float]]:
    """Mean and std as the folder's preprocessor_config.json states them (CLIP's own constants for
    the tiny CLIP, which, like the clip family's older snapshots, has none)."""
    config_file = folder / "preprocessor_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return list(config.get("image_mean", CLIP_MEAN)), list(config.get("image_std", CLIP_STD))


def _prepared(images: torch.Tensor, size: int, folder) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> [B, 3, size, size]: bilinear, no antialiasing, the folder's mean/std."""
    square = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in _normalisation(folder))
    return (square - mean) / std


def _hf_feature_map(hf, pixels: torch.Tensor) -> torch.Tensor:
    """HF's vision tower: last_hidden_state; SigLIP's attention-pooled token first in the class token's place."""
    with torch.no_grad():
        out = hf.vision_model(pixel_values=pixels)
    if hf.config.model_type == "siglip":
        return torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1)
    return out.last_hidden_state


def test_sizes_and_logit_scale(family):
    cls, size, vision_dim, text_dim, scale = FAMILIES[family["key"]]
    vlm, hf = family["vlm"], family["hf"]
    assert type(vlm) is cls
    grid = size // 16
    assert (vlm.image_size, vlm.grid, vlm.num_tokens, vlm.vision_dim, vlm.text_dim) == (
        size, grid, 1 + grid**2, vision_dim, text_dim
    )  # fmt: skip
    assert vlm.logit_scale == float(hf.logit_scale.detach().exp()) == pytest.approx(scale, rel=1e-6)
    mean, std = _normalisation(family["folder"])
    assert list(vlm.mean) == mean and list(vlm.std) == std


def test_feature_map_is_the_hf_vision_towers(family):
    vlm, size = family["vlm"], FAMILIES[family["key"]][1]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 150, 220), dtype=np.uint8))
    pixels = _prepared(images, size, family["folder"])
    ours = torch.stack([vlm.preprocess(image) for image in images])
    torch.testing.assert_close(ours, pixels, rtol=0, atol=0)

    features = vlm.feature_map(ours)
    assert features.shape == (2, vlm.num_tokens, vlm.vision_dim)
    # the same weights on the same batch: the same kernels, bit for bit
    torch.testing.assert_close(features, _hf_feature_map(family["hf"], pixels), rtol=0, atol=0)
    assert not torch.allclose(features[0], features[1])  # not vacuous: two images, two maps
    with pytest.raises(ValueError, match=rf"\[B, 3, {size}, {size}\]"):
        vlm.feature_map(ours[:, :, :100])


def test_image_embeddings_are_get_image_features(family):
    vlm, hf, size = family["vlm"], family["hf"], FAMILIES[family["key"]][1]
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 3, 64, 48), dtype=np.uint8))
    pixels = _prepared(images, size, family["folder"])
    with torch.no_grad():
        expected = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    got = vlm.encode_image_embeddings(pixels)
    assert got.shape == (3, vlm.text_dim)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if family["key"] == "siglip_dir":  # SigLIP's image embedding is the map's first token
        torch.testing.assert_close(F.normalize(vlm.feature_map(pixels)[:, 0], dim=-1), got, rtol=0, atol=0)


def _hf_text_embeddings(family, **tokenizer_kwargs) -> torch.Tensor:
    """HF's get_text_features, one prompt at a time, un-normalized mean over the templates, then
    L2-normalized; SigLIP's prompts without an attention mask (as it was trained)."""
    hf, tokenizer = family["hf"], family["tokenizer"]
    siglip = hf.config.model_type == "siglip"
    expected = []
    for name in CLEANED:
        features = []
        for template in TEMPLATES:
            ids = tokenizer(template.format(name), return_tensors="pt", **tokenizer_kwargs)
            inputs = {"input_ids": ids["input_ids"]} if siglip else dict(ids)
            with torch.no_grad():
                features.append(hf.get_text_features(**inputs).pooler_output)
        expected.append(F.normalize(torch.cat(features).mean(0), dim=-1))
    return torch.stack(expected)


def test_text_embeddings_are_get_text_features_over_the_templates(family):
    vlm, hf = family["vlm"], family["hf"]
    got = vlm.encode_texts(NAMES, TEMPLATES, batch_size=4)  # batches of 4 prompts, straddling classes
    assert got.shape == (2, vlm.text_dim)
    if family["key"] == "siglip_dir":
        # SigLIP pools the last position: prompts padded to the text tower's full length (64)
        length = hf.config.text_config.max_position_embeddings
        expected = _hf_text_embeddings(family, padding="max_length", max_length=length)
        unpadded = _hf_text_embeddings(family)
        assert (unpadded - expected).abs().max() > 1e-2  # the padding matters: this check can fail
    else:  # CLIP's causal text tower pools the first end-of-text token: padding changes nothing
        expected = _hf_text_embeddings(family)
    # batched and padded prompts against one prompt at a time; the longest sum: the MLP's hidden layer
    assert_close_across_batching(got, expected, hf.config.text_config.intermediate_size)


def test_siglip_prompts_are_padded_to_full_length_without_a_mask(tiny_backbones):
    vlm = load_vlm(tiny_backbones["siglip_dir"])
    hf = AutoModel.from_pretrained(tiny_backbones["siglip_dir"], local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbones["siglip_dir"], local_files_only=True)
    ids = tokenizer(["a photo of a dog."], padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        masked = hf.get_text_features(**ids).pooler_output  # with the attention mask HF's tokenizer returns
        unmasked = hf.get_text_features(input_ids=ids["input_ids"]).pooler_output
    got = vlm.encode_texts(["dog"], ["a photo of a {}."])
    torch.testing.assert_close(got, F.normalize(unmasked, dim=-1), rtol=0, atol=0)  # one prompt, one call
    assert (F.normalize(masked, dim=-1) - got).abs().max() > 1e-2  # the mask would change it


def _weights_digest(folder) -> str:
    """sha256 over the weight files (name, NUL, bytes), 16 hex characters: a CLIP folder's id."""
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def test_model_identity_never_collides_across_families(tiny_backbones, tmp_path):
    # a CLIP folder keeps the id of its weights alone (the id of existing shard folders and caches)
    assert model_identity(tiny_backbones["clip_dir"]) == _weights_digest(tiny_backbones["clip_dir"])
    # MetaCLIP 2's weights under CLIP's model_type: the same bytes, another family, another id
    relabelled = shutil.copytree(tiny_backbones["metaclip2_dir"], tmp_path / "as_clip")
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps({**config, "model_type": "clip"}))
    assert model_identity(relabelled) == _weights_digest(relabelled)
    assert model_identity(tiny_backbones["metaclip2_dir"]) != model_identity(relabelled)
    ids = {model_identity(tiny_backbones[key]) for key in FAMILIES}
    assert len(ids) == 3


def _one_line_error(model_dir, error=BackboneError) -> str:
    with pytest.raises(error) as caught:
        load_vlm(model_dir)
    message = str(caught.value)
    assert "\n" not in message and str(model_dir) in message
    return message


def test_load_vlm_refuses_unknown_and_naflex_folders(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = _one_line_error(tmp_path / "bert")
    assert "model_type 'bert'" in message and "'clip', 'metaclip_2', 'siglip'" in message

    Siglip2Config().save_pretrained(tmp_path / "naflex")
    message = _one_line_error(tmp_path / "naflex")
    assert "model_type 'siglip2'" in message and "NaFlex" in message and "spatial shapes" in message
    assert "fixed-resolution SigLIP 2" in message and "SiglipModel" in message and "model_type 'siglip'" in message

    (tmp_path / "empty").mkdir()
    assert "config.json missing" in _one_line_error(tmp_path / "empty")
    assert "not found" in _one_line_error(tmp_path / "nowhere", BackboneNotFoundError)


def test_normalisation_comes_from_the_folder(tiny_backbones, tmp_path):
    # MetaCLIP 2 must state its own: no preprocessor_config.json, no silent CLIP default
    metaclip2 = shutil.copytree(tiny_backbones["metaclip2_dir"], tmp_path / "metaclip2")
    (metaclip2 / "preprocessor_config.json").unlink()
    assert "image_mean/image_std" in _one_line_error(metaclip2)
    # a CLIP folder's stated mean and std are used (CLIP's constants only where it states none)
    clip = shutil.copytree(tiny_backbones["clip_dir"], tmp_path / "clip")
    (clip / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [1, 2, 4]}))
    vlm = load_vlm(clip)
    assert vlm.mean == (0.5, 0.4, 0.3) and vlm.std == (1.0, 2.0, 4.0)
    image = torch.full((3, 10, 10), 255, dtype=torch.uint8)
    torch.testing.assert_close(vlm.preprocess(image)[:, 0, 0], torch.tensor([0.5, 0.3, 0.175]))
    (clip / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5], "image_std": [1, 1, 1]}))
    assert "image_mean must be a list of 3 numbers" in _one_line_error(clip)


@pytest.fixture(scope="module")
def segmenter(tiny_backbones) -> SamSegmenter:
    return SamSegmenter(build_sam("tiny", tiny_backbones["sam_checkpoint"]))


def test_region_encoder_runs_each_family(family, segmenter):
    """The one encode path with the tiny SAM: image tokens are HF's feature map of the image (at
    detectron2's own size, which its resize keeps) rounded to float16; region tokens are SAM's."""
    image = np.random.default_rng(2).integers(0, 256, (800, 1024, 3), dtype=np.uint8)
    image[200:600, 300:700] = (200, 40, 30)
    encoder = RegionEncoder(segmenter, family["vlm"], precision="fp32")
    inputs = encoder.image_input(image)
    assert inputs.resized_size == (800, 1024)
    boxes = torch.tensor([[300.0, 200.0, 700.0, 600.0], [10.0, 20.0, 1000.0, 790.0]])
    (encoded,) = encoder.encode([inputs], [Prompts(boxes=boxes)])
    vlm = family["vlm"]
    assert encoded.image_tokens.shape == (vlm.num_tokens, vlm.vision_dim)
    assert encoded.image_tokens.dtype == torch.float16
    pixels = _prepared(torch.from_numpy(image).permute(2, 0, 1)[None], vlm.image_size, family["folder"])
    expected = _hf_feature_map(family["hf"], pixels)[0]
    # one float16 rounding of the same float32 values
    torch.testing.assert_close(encoded.image_tokens.float(), expected, rtol=F16_EPS, atol=F16_SUBNORMAL_STEP)
    assert encoded.regions.tokens.shape == (2, 256) and encoded.regions.masks.shape == (2, 800, 1024)
    (sam_only,) = encoder.decode(encoder.embed([inputs]), [Prompts(boxes=boxes)])
    torch.testing.assert_close(encoded.regions.tokens, sam_only.tokens, rtol=0, atol=0)


def test_tiny_siglip_positions_carry_the_grid(tiny_backbones):
    """No class token: all 16 x 16 rows are 2-D sin-cos positions at the patch content's scale."""
    hf = AutoModel.from_pretrained(tiny_backbones["siglip_dir"], local_files_only=True)
    embeddings = hf.vision_model.embeddings
    pos = embeddings.position_embedding.weight
    assert pos.shape == (256, 128)
    content_rms = embeddings.patch_embedding.weight.pow(2).sum().div(pos.shape[1]).sqrt()
    torch.testing.assert_close(pos.pow(2).mean().sqrt(), content_rms, rtol=1e-4, atol=0)
    d = torch.cdist(pos, pos)
    assert d[0, 1] < d[0, 15] < d[0, 255]
    assert math.isclose(float(hf.logit_bias.detach()), -10.0)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module) is not None


def _with_siglip_tokenizer(siglip_dir, tmp_path, write_model) -> Path:
    """The tiny SigLIP with a SentencePiece ``SiglipTokenizer`` (as SigLIP (1) folders hold) in place
    of its Gemma tokenizer; ``write_model(path)`` writes the SentencePiece model file."""
    folder = shutil.copytree(siglip_dir, tmp_path / "siglip_sentencepiece")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    write_model(folder / "spiece.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "SiglipTokenizer", "model_max_length": 64})
    )
    return folder


@pytest.mark.skipif(not (_has("sentencepiece") and _has("google.protobuf")), reason="needs sentencepiece, protobuf")
def test_siglip_sentencepiece_tokenizer(tiny_backbones, tmp_path):
    """A SigLIP (1) folder: its SiglipTokenizer's prompts, padded to 64 without a mask, are HF's."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t.format(n) for n in CLEANED + ["dog", "cat"] for t in TEMPLATES * 20))

    def train(path: Path) -> None:
        prefix = str(path.with_suffix(""))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
        Path(prefix + ".model").replace(path)

    folder = _with_siglip_tokenizer(tiny_backbones["siglip_dir"], tmp_path, train)
    vlm = load_vlm(folder)
    assert type(vlm.tokenizer).__name__ == "SiglipTokenizer"
    family = {
        "hf": AutoModel.from_pretrained(folder, local_files_only=True).eval(),
        "tokenizer": AutoTokenizer.from_pretrained(folder, local_files_only=True),
    }
    expected = _hf_text_embeddings(family, padding="max_length", max_length=64)
    got = vlm.encode_texts(NAMES, TEMPLATES, batch_size=4)
    assert_close_across_batching(got, expected, family["hf"].config.text_config.intermediate_size)


@pytest.mark.skipif(_has("sentencepiece"), reason="sentencepiece is installed")
def test_siglip_sentencepiece_tokenizer_without_the_package(tiny_backbones, tmp_path):
    folder = _with_siglip_tokenizer(tiny_backbones["siglip_dir"], tmp_path, lambda path: path.write_bytes(b"\0"))
    message = _one_line_error(folder)
    assert "needs a package that is not installed" in message and "pip install sentencepiece" in message
