"""Frozen backbones against the libraries' own reference paths (SamPredictor, HF CLIP)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from tolerances import assert_close_across_batching, assert_masks_agree
from torch.nn import functional as F
from torchvision.transforms import functional as TF
from transformers import CLIPVisionModel

from regionspot_pl.backbones import (
    CLIP_MEAN,
    CLIP_STD,
    OFFICIAL_SAM_CHECKPOINTS,
    TEMPLATES,
    TINY_SAM_CONFIG,
    ClipEncoder,
    Prompts,
    SamSegmenter,
    build_sam,
    clip_preprocess,
    load_clip,
    model_identity,
    text_embeddings,
)
from regionspot_pl.backbones.sam import build_tiny_sam
from regionspot_pl.backbones.tiny import write_tiny_backbones
from regionspot_pl.tiny import main as tiny_main

# (x0, y0, x1, y1) in original pixels of a 150 x 220 (H x W) image, deliberately non-square
# so that the resize/pad/unpad bookkeeping is exercised.
IMAGE_HW = (150, 220)
BOXES = torch.tensor(
    [
        [10.0, 20.0, 100.0, 120.0],
        [0.0, 0.0, 219.0, 149.0],
        [150.5, 30.25, 170.0, 60.0],
        [5, 5, 8, 9],
    ]
)


@pytest.fixture(scope="module")
def sam(tiny_backbones):
    return build_sam("tiny", tiny_backbones["sam_checkpoint"])


@pytest.fixture(scope="module")
def segmenter(sam):
    return SamSegmenter(sam)


@pytest.fixture(scope="module")
def clip(tiny_backbones):
    model, tokenizer = load_clip(tiny_backbones["clip_dir"])
    return ClipEncoder(model, tokenizer)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*IMAGE_HW, 3), dtype=np.uint8)
    img[30:100, 40:120] = (200, 30, 30)  # a flat object, so masks are not pure noise
    return img


def _decoder_reduction(sam) -> int:
    """The longest sum in SAM's mask decoder: its MLP's hidden width (2048)."""
    return sam.mask_decoder.transformer.layers[0].mlp.lin1.out_features


def _predictor_reference(sam, image, boxes):
    """segment-anything's own path: SamPredictor, boxes through its transform, one decoder call;
    hs captured from the decoder's transformer, the image-encoder input from a pre-hook."""
    predictor = SamPredictor(sam)
    seen = {}
    pre = sam.image_encoder.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    hook = sam.mask_decoder.transformer.register_forward_hook(lambda m, args, out: seen.update(hs=out[0]))
    try:
        predictor.set_image(image)
        masks, iou, _ = predictor.predict_torch(
            None,
            None,
            boxes=predictor.transform.apply_boxes_torch(boxes, image.shape[:2]),
            multimask_output=False,
        )
    finally:
        pre.remove()
        hook.remove()
    return seen["x"][0], predictor.features[0], seen["hs"][:, 1], masks[:, 0], iou[:, 0]


def _decode_one(segmenter, embedding, prompts, image_size, **kwargs):
    """``SamSegmenter.decode`` for one image: [256, h, w] embedding, one Prompts."""
    return segmenter.decode(embedding[None], [prompts], [image_size], **kwargs)[0]


# --------------------------------------------------------------------------------------- SAM


def test_build_tiny_sam_is_frozen(sam):
    assert not sam.training
    assert all(not p.requires_grad for p in sam.parameters())
    # the session's checkpoint is written at the tests' 256 px input and read back at it
    assert sam.image_encoder.img_size == 256 and sam.prompt_encoder.image_embedding_size == (16, 16)
    assert build_tiny_sam().image_encoder.img_size == TINY_SAM_CONFIG["image_size"] == 512
    assert sam.image_encoder.patch_embed.proj.out_channels == TINY_SAM_CONFIG["encoder_embed_dim"]


def test_build_vit_b_through_segment_anything():
    # random weights (~0.5 s): the official builder's architecture, frozen, 1024 input
    sam = build_sam("vit_b", None)
    assert not sam.training and all(not p.requires_grad for p in sam.parameters())
    assert SamSegmenter(sam).image_size == 1024
    assert len(sam.image_encoder.blocks) == 12


def test_segmenter_matches_sam_predictor(segmenter, sam, image):
    ref_input, ref_embedding, ref_tokens, ref_masks, ref_iou = _predictor_reference(sam, image, BOXES)

    x = segmenter.transform(image)
    side, grid = segmenter.image_size, segmenter.image_size // 16
    assert x.shape == (3, side, side) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref_input, rtol=0, atol=0)

    embedding = segmenter.encode_images(x[None])
    assert embedding.shape == (1, 256, grid, grid)
    torch.testing.assert_close(embedding[0], ref_embedding)

    decoded = _decode_one(segmenter, embedding[0], Prompts(boxes=BOXES), IMAGE_HW)
    assert decoded.tokens.shape == (4, 256) and decoded.tokens.dtype == torch.float32
    assert decoded.masks.shape == (4, *IMAGE_HW) and decoded.masks.dtype == torch.bool
    assert decoded.iou.shape == (4,) and decoded.iou.dtype == torch.float32
    torch.testing.assert_close(decoded.tokens, ref_tokens)
    assert torch.equal(decoded.masks, ref_masks)
    assert decoded.masks.any()  # the comparison is not vacuous
    torch.testing.assert_close(decoded.iou, ref_iou)


def test_encode_images_batched_equals_single(segmenter, image):
    other = np.ascontiguousarray(image[::-1])
    batch = torch.stack([segmenter.transform(image), segmenter.transform(other)])
    both = segmenter.encode_images(batch)
    # the longest sum in the tiny encoder: the neck's 3x3 convolution over 256 channels
    reduction = segmenter.sam.image_encoder.neck[2].weight[0].numel()
    assert_close_across_batching(both[1:], segmenter.encode_images(batch[1:]), reduction)


def test_decode_one_decoder_call_and_chunks(segmenter, sam, image):
    embedding = segmenter.encode_images(segmenter.transform(image)[None])[0]
    calls = []
    hook = sam.mask_decoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        whole = _decode_one(segmenter, embedding, Prompts(boxes=BOXES), IMAGE_HW)
        assert len(calls) == 1  # all boxes batched, no python loop over boxes
        chunked = _decode_one(segmenter, embedding, Prompts(boxes=BOXES), IMAGE_HW, max_prompts_per_call=3)
        assert len(calls) == 3
    finally:
        hook.remove()
    # decoder batches of 3 and 1 instead of 4
    assert_close_across_batching(chunked.tokens, whole.tokens, _decoder_reduction(sam))
    assert_masks_agree(chunked.masks, whole.masks)
    assert_close_across_batching(chunked.iou, whole.iou, _decoder_reduction(sam))
    without = _decode_one(segmenter, embedding, Prompts(boxes=BOXES), IMAGE_HW, with_masks=False)
    assert without.masks is None
    torch.testing.assert_close(without.tokens, whole.tokens, rtol=0, atol=0)


def test_decode_no_boxes(segmenter, image):
    embedding = segmenter.encode_images(segmenter.transform(image)[None])[0]
    decoded = _decode_one(segmenter, embedding, Prompts(boxes=torch.zeros(0, 4)), IMAGE_HW)
    assert decoded.tokens.shape == (0, 256) and decoded.tokens.dtype == torch.float32
    assert decoded.masks.shape == (0, *IMAGE_HW) and decoded.masks.dtype == torch.bool
    assert decoded.iou.shape == (0,)
    multi = _decode_one(segmenter, embedding, Prompts(boxes=torch.zeros(0, 4)), IMAGE_HW, multimask_output=True)
    assert multi.tokens.shape == (0, 3, 256) and multi.masks.shape == (0, 3, *IMAGE_HW) and multi.iou.shape == (0, 3)


def test_segmenter_rejects_bad_input(segmenter, image):
    with pytest.raises(ValueError, match="uint8"):
        segmenter.transform(image.astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        segmenter.transform(image[..., 0])
    side, grid = segmenter.image_size, segmenter.image_size // 16
    with pytest.raises(ValueError, match=rf"\[B, 3, {side}, {side}\]"):
        segmenter.encode_images(torch.zeros(1, 3, side // 2, side // 2))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        Prompts(boxes=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"point_labels must be \[N, K\]"):
        Prompts(point_coords=torch.zeros(3, 2, 2), point_labels=torch.ones(3, 1))
    embeddings = torch.zeros(2, 256, grid, grid)
    boxes, points = Prompts(boxes=BOXES), Prompts(point_coords=torch.ones(4, 1, 2), point_labels=torch.ones(4, 1))
    with pytest.raises(ValueError, match="must be alike"):
        segmenter.decode(embeddings, [boxes, points], [IMAGE_HW, IMAGE_HW])


def test_missing_checkpoint_names_official_file_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_sam("vit_b", tmp_path / "nope.pth")
    assert OFFICIAL_SAM_CHECKPOINTS["vit_b"] == "sam_vit_b_01ec64.pth"
    assert "sam_vit_b_01ec64.pth" in str(err.value) and "--sam_checkpoint" in str(err.value)


def test_checkpoint_of_another_type_is_rejected_before_building(tiny_backbones, monkeypatch):
    # the type check reads the state dict only; a real vit_b must not even be instantiated
    import regionspot_pl.backbones.sam as sam_module

    monkeypatch.setitem(sam_module.sam_model_registry, "vit_b", _must_not_build)
    with pytest.raises(ValueError, match=r"does not fit --sam_type vit_b.*--sam_type tiny"):
        build_sam("vit_b", tiny_backbones["sam_checkpoint"])


def _must_not_build(checkpoint=None):
    raise AssertionError("built a full-size SAM for a checkpoint that does not fit")


def test_unusable_checkpoints(tmp_path, tiny_backbones):
    not_sam = tmp_path / "not_sam.pth"
    torch.save({"weight": torch.zeros(2)}, not_sam)
    with pytest.raises(ValueError, match="not a SAM state dict"):
        build_sam("tiny", not_sam)

    # arbitrary pickled objects are refused (weights_only=True), reported as a ValueError
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": Path("x")}, unsafe)
    with pytest.raises(ValueError, match="could not be read"):
        build_sam("tiny", unsafe)

    # right shapes but a missing key: load_state_dict's strict error, reworded
    state = torch.load(tiny_backbones["sam_checkpoint"], weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match="(?s)does not fit --sam_type tiny.*iou_token"):
        build_sam("tiny", broken)

    with pytest.raises(ValueError, match="unknown --sam_type"):
        build_sam("vit_x", None)


# -------------------------------------------------------------------------------------- CLIP


def test_templates():
    """The reference's 81: the plain '{}.' first, then CLIP's 80 ImageNet templates."""
    assert len(TEMPLATES) == 81 and len(set(TEMPLATES)) == 81
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert TEMPLATES[0] == "{}." and TEMPLATES[1] == "a bad photo of a {}."
    assert TEMPLATES[-1] == "a tattoo of the {}." and "a photo of a {}." in TEMPLATES


def test_clip_preprocess_matches_manual():
    img = torch.randint(0, 256, (3, 90, 130), dtype=torch.uint8)
    out = clip_preprocess(img, 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # torchvision's tensor resize without antialiasing, as the reference's torchvision did
    manual = TF.resize(img.float() / 255, [224, 224], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    manual = (manual - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(out, manual)
    # float input already in [0, 1] gives the same
    torch.testing.assert_close(clip_preprocess(img.float() / 255, 224), out)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        clip_preprocess(img.permute(1, 2, 0), 224)


def test_clip_feature_map_matches_hf(clip, tiny_backbones, image):
    assert (clip.vision_dim, clip.text_dim, clip.image_size, clip.num_tokens, clip.grid) == (128, 64, 224, 197, 14)
    assert clip.logit_scale == pytest.approx(float(clip.model.logit_scale.exp()))
    pixels = torch.stack([clip_preprocess(torch.from_numpy(image).permute(2, 0, 1), 224)] * 2)
    torch.testing.assert_close(clip.preprocess(torch.from_numpy(image).permute(2, 0, 1)), pixels[0], rtol=0, atol=0)
    pixels[1] = pixels[1].flip(-1)
    features = clip.feature_map(pixels)
    assert features.shape == (2, 197, 128)
    # an independently loaded HF vision tower gives the same last_hidden_state
    vision = CLIPVisionModel.from_pretrained(tiny_backbones["clip_dir"], local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(features, vision(pixel_values=pixels).last_hidden_state)
    image_embeddings = clip.encode_image_embeddings(pixels)
    assert image_embeddings.shape == (2, 64)
    torch.testing.assert_close(image_embeddings.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[B, 3, 224, 224\]"):
        clip.feature_map(pixels[:, :, :100])


def test_tiny_clip_has_sincos_positions(clip):
    embeddings = clip.model.vision_model.embeddings
    pos = embeddings.position_embedding.weight
    assert torch.count_nonzero(pos[0]) == 0  # class token: no position
    # comparable to the patch content (RMS for unit-variance pixels), not HF's 0.02-std init
    content_rms = embeddings.patch_embedding.weight.pow(2).sum().div(pos.shape[1]).sqrt()
    torch.testing.assert_close(pos[1:].pow(2).mean().sqrt(), content_rms, rtol=1e-4, atol=0)
    # neighbouring patches are closer than far-apart ones (a 2-D layout on a 14 x 14 grid)
    d = torch.cdist(pos[1:], pos[1:])
    assert d[0, 1] < d[0, 13] < d[0, 195]


def test_encode_texts_template_average(clip):
    templates = ["a photo of a {}.", "itap of my {}.", "the {} in a video game."]
    got = clip.encode_texts(["aerosol_can", "traffic light-other"], templates, batch_size=2)
    assert got.shape == (2, 64)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    expected = []
    for name in ["aerosol_can", "traffic light"]:  # '-other' removed, the underscore kept
        feats = []
        for t in templates:  # one prompt at a time: no padding, no batching
            ids = clip.tokenizer(t.format(name), return_tensors="pt")
            with torch.no_grad():
                out = clip.model.get_text_features(**ids)
            feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
        expected.append(F.normalize(torch.cat(feats).mean(0), dim=-1))
    # batches of 2 padded prompts against one prompt at a time; the longest sum: the MLP's hidden layer
    assert_close_across_batching(got, torch.stack(expected), clip.model.config.text_config.intermediate_size)
    # the default is all 81 templates
    assert clip.encode_texts(["dog"]).shape == (1, 64)


def test_text_embedding_cache(clip, tmp_path, monkeypatch):
    cache = tmp_path / "text.h5"
    calls = []
    original = clip.encode_texts

    def counting(names, templates=TEMPLATES, batch_size=256):
        calls.append(list(names))
        return original(names, templates, batch_size)

    monkeypatch.setattr(clip, "encode_texts", counting)
    first = text_embeddings(clip, ["cat", "dog"], cache, "model-a")
    assert first.shape == (2, 64) and first.dtype == torch.float32 and len(calls) == 1
    again = text_embeddings(clip, ["cat", "dog"], cache, "model-a")
    assert len(calls) == 1  # served from the cache
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # '-stuff' is cleaned before hashing: the same prompts, the same entry
    text_embeddings(clip, ["cat", "dog-stuff"], cache, "model-a")
    assert len(calls) == 1

    other_vocab = text_embeddings(clip, ["dog", "cat"], cache, "model-a")
    other_model = text_embeddings(clip, ["cat", "dog"], cache, "model-b")
    assert len(calls) == 3
    torch.testing.assert_close(other_vocab, first.flip(0))
    torch.testing.assert_close(other_model, first)

    with h5py.File(cache, "r") as f:
        assert set(f) == {"model-a", "model-b"} and len(f["model-a"]) == 2
        (entry,) = f["model-b"].values()
        assert [n.decode() for n in entry["class_names"][()]] == ["cat", "dog"]
        assert entry["templates"].shape == (81,)
    assert not list(tmp_path.glob("*.tmp"))  # temp files replaced, none left over


def test_model_identity(tiny_backbones, tmp_path):
    ident = model_identity(tiny_backbones["clip_dir"])
    assert re.fullmatch(r"[0-9a-f]{16}", ident)
    assert model_identity(tiny_backbones["clip_dir"]) == ident
    other = write_tiny_backbones(tmp_path, seed=1)
    assert model_identity(other["clip_dir"]) != ident
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_identity(tmp_path)


def test_load_clip_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP directory"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a CLIP directory"):
        load_clip(tmp_path)


# ------------------------------------------------------------------------------ tiny writer


def test_tiny_cli_is_deterministic_and_loadable(tmp_path, capsys):
    assert tiny_main([str(tmp_path), "--seed", "0"]) == 0
    paths = {name: Path(path) for name, path in (line.split(": ", 1) for line in capsys.readouterr().out.splitlines())}
    assert paths == {
        "sam_checkpoint": tmp_path / "sam_tiny.pth",
        "clip_dir": tmp_path / "clip_tiny",
        "siglip_dir": tmp_path / "siglip_tiny",
        "metaclip2_dir": tmp_path / "metaclip2_tiny",
        "sam2_checkpoint": tmp_path / "sam2.1_hiera_tiny_random.pt",
        "sam2_config": tmp_path / "sam2.1_hiera_tiny_random.yaml",
    }
    reference = write_tiny_backbones(tmp_path / "reference", seed=0)  # at the default sizes, as the command
    for name in ("sam_checkpoint", "sam2_checkpoint", "sam2_config"):
        assert paths[name].read_bytes() == reference[name].read_bytes()
    for folder in ("clip_dir", "siglip_dir", "metaclip2_dir"):
        files = sorted(p.name for p in reference[folder].iterdir())
        assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
        assert files == sorted(p.name for p in paths[folder].iterdir())
        for name in files:
            assert (paths[folder] / name).read_bytes() == (reference[folder] / name).read_bytes(), (folder, name)
    # loadable offline by the library's own entry points
    build_sam("tiny", paths["sam_checkpoint"])
    model, tokenizer = load_clip(paths["clip_dir"])
    ids = tokenizer("a photo of a dog.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id


def test_decode_of_several_images_equals_the_per_image_path(segmenter):
    """All boxes of several images in few decoder calls give each image's own decode."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(300, 400), (512, 384), (200, 510)]
    grid = segmenter.image_size // 16
    embeddings = torch.randn(3, 256, grid, grid, generator=gen)
    boxes = []
    for (h, w), n in zip(sizes, (5, 0, 7)):
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes.append(torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=gen) * torch.tensor([w / 2, h / 2])], 1))
    prompts = [Prompts(boxes=b) for b in boxes]
    for per_call in (256, 4):  # one call for all 12 boxes; calls that straddle images
        batched = segmenter.decode(embeddings, prompts, sizes, max_prompts_per_call=per_call)
        for i, decoded in enumerate(batched):
            expected = _decode_one(segmenter, embeddings[i], prompts[i], sizes[i])
            assert decoded.tokens.shape == expected.tokens.shape == (len(boxes[i]), 256)
            if len(decoded.tokens):
                assert_close_across_batching(decoded.tokens, expected.tokens, _decoder_reduction(segmenter.sam))
                assert_close_across_batching(decoded.iou, expected.iou, _decoder_reduction(segmenter.sam))
            assert decoded.masks.shape == expected.masks.shape == (len(boxes[i]), *sizes[i])
            assert_masks_agree(decoded.masks, expected.masks)
    with pytest.raises(ValueError, match="one of each per image"):
        segmenter.decode(embeddings, prompts[:2], sizes)


def test_one_reading_of_device():
    from regionspot_pl.backbones.common import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, message in (("gpu", "is not a device"), ("meta", "expected auto, cpu, cuda"), ("cuda:99", "cuda:99")):
        with pytest.raises(DeviceError, match=message):
            resolve_device(bad)
