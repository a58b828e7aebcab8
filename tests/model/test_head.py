"""The trained part: head shapes and padding, logits, focal loss, checkpoint import."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close_across_batching

from regionspot_pl import (
    CheckpointError,
    RegionSpotHead,
    convert_official,
    load_head,
    region_focal_loss,
    region_logits,
    save_head,
)
from regionspot_pl.convert import main as convert_main

SMALL = dict(sam_dim=256, clip_dim=64, text_dim=32, depth=3, num_heads=8, ffn_dim=128)


def _inputs(batch: int = 2, boxes: int = 5, tokens: int = 17, clip_dim: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, boxes, 256, generator=g), torch.randn(batch, tokens, clip_dim, generator=g)


def test_head_state_dict_keys_are_the_official_ones():
    keys = set(RegionSpotHead().state_dict())
    expected = {
        "to_clip.weight",
        "to_clip.bias",
        "projector.weight",
        "projector.bias",
        "decoder.norm.weight",
        "decoder.norm.bias",
    }
    for n in range(3):
        for attn in ("self_attn", "multihead_attn"):
            for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                expected.add(f"decoder.layers.{n}.{attn}.{p}")
        for m in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            expected |= {f"decoder.layers.{n}.{m}.weight", f"decoder.layers.{n}.{m}.bias"}
    assert keys == expected


@pytest.mark.parametrize("variant,clip_dim,text_dim", [("BB", 768, 512), ("BL", 1024, 768), ("BL@336", 1024, 768)])
def test_variants_have_the_published_sizes(variant, clip_dim, text_dim):
    head = RegionSpotHead.from_variant(variant)
    assert head.to_clip.weight.shape == (clip_dim, 256)
    assert head.projector.weight.shape == (text_dim, clip_dim)
    assert len(head.decoder.layers) == 3
    assert head.decoder.layers[0].linear1.out_features == 2048


def test_forward_shape_and_padding_invariance():
    head = RegionSpotHead(**SMALL).eval()
    sam, clip = _inputs()
    with torch.no_grad():
        alone = head(sam[:1, :3], clip[:1])  # image 0 with its 3 real boxes
        mask = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
        padded = head(sam, clip, padding_mask=mask)
        # whatever sits in the padded slots must not matter
        sam2 = sam.clone()
        sam2[0, 3:] = 1e3 * torch.randn(2, 256)
        padded2 = head(sam2, clip, padding_mask=mask)
    assert padded.shape == (2, 5, 32)
    # a batch of 2 x 5 queries against 1 x 3: the same sums in another order; the longest one is
    # the SAM token's projection (256 wide)
    assert_close_across_batching(padded[0, :3], alone[0], reduction_length=256)
    assert_close_across_batching(padded2[0, :3], padded[0, :3], reduction_length=256)
    torch.testing.assert_close(padded2[1], padded[1])


def test_without_padding_the_queries_interact():
    """Self-attention is real: changing one query changes the others (so masking matters)."""
    head = RegionSpotHead(**SMALL).eval()
    sam, clip = _inputs(batch=1)
    with torch.no_grad():
        a = head(sam, clip)
        sam[0, 4] += 5
        b = head(sam, clip)
    assert not torch.allclose(a[0, :4], b[0, :4])


def test_class_token_ablation_drops_the_first_token():
    head = RegionSpotHead(**SMALL, use_class_token=False).eval()
    sam, clip = _inputs(batch=1)
    with torch.no_grad():
        a = head(sam, clip)
        clip[0, 0] += 100.0  # class token is ignored
        b = head(sam, clip)
        clip[0, 1] += 100.0
        c = head(sam, clip)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)


def test_forward_rejects_wrong_shapes():
    head = RegionSpotHead(**SMALL)
    sam, clip = _inputs()
    with pytest.raises(ValueError, match="clip_tokens must be"):
        head(sam, torch.randn(2, 17, 65))
    with pytest.raises(ValueError, match="sam_tokens must be"):
        head(torch.randn(2, 5, 128), clip)
    with pytest.raises(ValueError, match="padding_mask"):
        head(sam, clip, padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_region_logits_are_scaled_cosine():
    regions = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    expected = 100 * torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    torch.testing.assert_close(region_logits(regions, texts), expected)
    assert region_logits(torch.randn(2, 3, 2), texts).shape == (2, 3, 2)


def test_focal_loss_equals_direct_computation():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0, 2, 1]])
    valid = torch.tensor([[True, True, False]])  # third box is padding

    def focal(x: float, t: int) -> float:
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        a = 0.25 if t else 0.75
        return -a * (1 - pt) ** 2 * math.log(pt)

    direct = sum(focal(float(logits[0, b, c]), int(labels[0, b] == c)) for b in range(2) for c in range(3)) / 2
    got = region_focal_loss(logits, labels, valid)
    assert got.item() == pytest.approx(direct, rel=1e-6)
    # unknown labels (-1) are excluded like padding
    got2 = region_focal_loss(logits, torch.tensor([[0, 2, -1]]))
    assert got2.item() == pytest.approx(direct, rel=1e-6)
    # nothing to count: zero, still differentiable
    empty = region_focal_loss(logits.requires_grad_(), labels, torch.zeros(1, 3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0


def test_focal_loss_rejects_out_of_vocabulary_labels():
    with pytest.raises(ValueError, match="outside a vocabulary"):
        region_focal_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 3]]))


def test_gradients_reach_every_head_parameter_and_not_the_cached_inputs():
    head = RegionSpotHead(**SMALL)
    sam, clip = _inputs()
    texts = torch.randn(7, 32)
    loss = region_focal_loss(region_logits(head(sam, clip), texts), torch.randint(0, 7, (2, 5)))
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not sam.requires_grad and not clip.requires_grad and not texts.requires_grad


def _official_checkpoint(head: RegionSpotHead, vision_tokens: int = 257) -> dict:
    """A file shaped like the released RegionSpot checkpoints (frozen backbones included)."""
    model = {f"model.{k}": v.clone() for k, v in head.state_dict().items()}
    model["model.sam.image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 8)
    model["model.clip_model.visual.positional_embedding"] = torch.zeros(vision_tokens, head.config.clip_dim)
    model["model.clip_model.positional_embedding"] = torch.zeros(77, head.config.text_dim)
    return {"model": model, "iteration": 450000}


@pytest.mark.parametrize("variant,tokens", [("BB", 197), ("BL@336", 577)])
def test_official_weights_round_trip_through_convert_and_load_head(tmp_path, variant, tokens):
    torch.manual_seed(0)
    head = RegionSpotHead.from_variant(variant).eval()
    src = tmp_path / "regionspot_official.pth"
    torch.save(_official_checkpoint(head, tokens), src)
    assert convert_main([str(src), str(tmp_path / "head.pt")]) == 0
    loaded = load_head(tmp_path / "head.pt")
    assert loaded.variant == variant and not loaded.training
    sam, clip = _inputs(clip_dim=head.config.clip_dim, tokens=tokens)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sam, clip), head(sam, clip), rtol=0, atol=0)


def test_save_and_load_custom_head(tmp_path):
    head = RegionSpotHead(**SMALL).eval()
    loaded = load_head(save_head(head, tmp_path / "h.pt"))
    assert loaded.config == head.config and loaded.variant == "custom"
    for k, v in head.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_bad_checkpoints_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_official(tmp_path / "missing.pth", tmp_path / "out.pt")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read.*Expected a RegionSpot checkpoint"):
        convert_official(garbage, tmp_path / "out.pt")
    no_model = tmp_path / "no_model.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, no_model)
    with pytest.raises(CheckpointError, match="no 'model' dict.*'model.to_clip.weight'"):
        convert_official(no_model, tmp_path / "out.pt")
    sam_only = tmp_path / "sam_only.pth"
    torch.save({"model": {"model.sam.x": torch.zeros(1)}}, sam_only)
    with pytest.raises(CheckpointError, match="no RegionSpot head weights"):
        convert_official(sam_only, tmp_path / "out.pt")
    # an official checkpoint handed to load_head directly: says to convert it first
    head = RegionSpotHead(**SMALL)
    official = tmp_path / "official.pth"
    torch.save(_official_checkpoint(head, 17), official)
    with pytest.raises(CheckpointError, match="regionspot_pl.convert"):
        load_head(official)
    # the CLI reports instead of a traceback
    assert convert_main([str(garbage), str(tmp_path / "out.pt")]) == 2
    assert not (tmp_path / "out.pt").exists()


class _NotATensor:
    pass


def test_pickled_code_is_never_executed(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary objects is refused, not unpickled."""
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"model.to_clip.weight": _NotATensor()}}, evil)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_official(evil, tmp_path / "out.pt")
