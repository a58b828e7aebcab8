"""Heads as model folders (config.json + model.safetensors + README.md): round trips, refusals,
convert and fit writing them, and every --head accepting them."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from huggingface_hub import ModelHubMixin
from safetensors.torch import save_file
from tiny_fit import tiny_fit_config

from regionspot_pl import load_head, load_pretrained, save_head, save_pretrained
from regionspot_pl.convert import main as convert_main
from regionspot_pl.model import CheckpointError, CheckpointNotFoundError, RegionSpotHead
from regionspot_pl.model.pretrained import is_hub_id

SMALL = {"clip_dim": 48, "text_dim": 32, "depth": 2, "num_heads": 4, "ffn_dim": 64}


def _head(seed: int = 0, **sizes) -> RegionSpotHead:
    torch.manual_seed(seed)
    return RegionSpotHead(**{**SMALL, **sizes}).eval()


def _assert_same(a: RegionSpotHead, b: RegionSpotHead) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_folder_round_trip_is_bit_identical(tmp_path, monkeypatch):
    head = _head(use_class_token=False, dropout=0.0)
    folder = save_pretrained(head, tmp_path / "head", metrics={"val/AP": 0.25},
                             training={"data": ["demo_train"], "steps": 10})  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # loading never unpickles
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    loaded = load_pretrained(folder)
    _assert_same(loaded, head)
    assert loaded.variant == "custom" and not loaded.training
    _assert_same(load_head(folder), head)  # every --head takes the folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "regionspot_head" and config["use_class_token"] is False
    card = (folder / "README.md").read_text()
    assert "| variant | custom |" in card and "| val/AP | 0.2500 |" in card
    assert "| training data | demo_train |" in card and "| training steps | 10 |" in card
    sam, clip = torch.randn(2, 3, 256), torch.randn(2, 17, 48)
    with torch.no_grad():
        assert torch.equal(loaded(sam, clip), head(sam, clip))


def test_published_variant_card_names_its_backbones(tmp_path):
    folder = save_pretrained(RegionSpotHead.from_variant("BB"), tmp_path / "bb")
    card = (folder / "README.md").read_text()
    assert "# RegionSpot head (BB)" in card and "openai/clip-vit-base-patch16" in card
    assert "Not evaluated when this folder was written" in card
    assert load_head(folder).variant == "BB"


def test_folder_whose_config_and_weights_disagree_is_refused(tmp_path):
    a = save_pretrained(_head(), tmp_path / "a")
    b = save_pretrained(_head(clip_dim=64), tmp_path / "b")
    (a / "config.json").write_text((b / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_pretrained(a)
    message = str(err.value)
    assert str(a / "model.safetensors") in message and str(a / "config.json") in message
    assert "'to_clip.weight' is [48, 256], the config needs [64, 256]" in message
    assert "come from different heads" in message

    c = save_pretrained(_head(), tmp_path / "c")
    state = {k: v for k, v in _head().state_dict().items() if k != "projector.bias"}
    save_file({**state, "extra.weight": torch.zeros(1)}, str(c / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['projector.bias'\], unexpected "
                       r"tensors \['extra.weight'\]"):  # fmt: skip
        load_head(c)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"clip_dim": "48"}, r"clip_dim must be int, got '48' \(str\)"),
        ({"use_class_token": 1}, "use_class_token must be bool"),
        ({"depth": 0}, "depth must be >= 1"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"num_heads": 5}, "clip_dim 48 is not divisible by num_heads 5"),
        ({"colour": "red"}, r"unknown keys \['colour'\]"),
        ({"ffn_dim": None}, "ffn_dim must be int"),
        ({"model_type": "bert"}, "model_type is 'bert', expected 'regionspot_head'"),
        ({"format_version": 7}, "format_version 7 is not supported"),
        ({"metrics": [1]}, "metrics must be an object or null"),
        ({"logit_scale": -3.0}, "logit_scale must be a positive number, got -3.0"),
        ({"logit_scale": "hot"}, "logit_scale must be float"),
    ],
)
def test_bad_config_is_refused_naming_the_file_and_key(tmp_path, edit, message):
    folder = save_pretrained(_head(), tmp_path / "h")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=message) as err:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


def test_a_folder_written_before_heads_recorded_their_logit_scale_is_a_clip_head(tmp_path):
    folder = save_pretrained(_head(), tmp_path / "h")
    config = json.loads((folder / "config.json").read_text())
    del config["logit_scale"]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_pretrained(folder).config.logit_scale == 100.0  # CLIP's exp(logit_scale), as the reference


def test_missing_or_broken_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="head folder not found: .*nope"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_head(tmp_path / "nope.pt")
    folder = save_pretrained(_head(), tmp_path / "h")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not a head folder: model.safetensors is missing"):
        load_head(folder)
    broken = save_pretrained(_head(), tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_head(broken)
    garbage = save_pretrained(_head(), tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.safetensors could not be read as safetensors"):
        load_head(garbage)
    with pytest.raises(CheckpointError, match="is a file"):
        save_pretrained(_head(), save_head(_head(), tmp_path / "file.pt"))


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("someone/regionspot-bl")
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/head")  # a mistyped local path, not a repository
    assert not is_hub_id("heads/bl.pt") and not is_hub_id("a/b/c") and not is_hub_id("../x")


def _official_checkpoint(head: RegionSpotHead, vision_tokens: int) -> dict:
    """A file shaped like the released RegionSpot checkpoints (frozen backbones included)."""
    model = {f"model.{k}": v.clone() for k, v in head.state_dict().items()}
    model["model.sam.image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 8)
    model["model.clip_model.visual.positional_embedding"] = torch.zeros(vision_tokens, head.config.clip_dim)
    return {"model": model, "iteration": 450000}


def test_convert_writes_a_folder_or_a_pt_file(tmp_path, capsys):
    torch.manual_seed(0)
    head = RegionSpotHead.from_variant("BL").eval()
    src = tmp_path / "regionspot_bl_336.pth"
    torch.save(_official_checkpoint(head, 577), src)
    assert convert_main([str(src), str(tmp_path / "bl336")]) == 0
    assert "wrote BL@336 head to" in capsys.readouterr().out
    folder = load_head(tmp_path / "bl336")
    assert folder.variant == "BL@336"
    _assert_same(folder, head)
    card = (tmp_path / "bl336" / "README.md").read_text()
    assert "openai/clip-vit-large-patch14-336" in card and "regionspot_bl_336.pth" in card
    assert convert_main([str(src), str(tmp_path / "bl336.pt")]) == 0
    _assert_same(load_head(tmp_path / "bl336.pt"), head)
    # a destination that is a file and not .pt is refused, not overwritten
    (tmp_path / "taken").write_text("mine")
    assert convert_main([str(src), str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "taken").read_text() == "mine"


def test_fit_exports_the_head_folder_beside_head_pt(demo_shards, tmp_path):
    from regionspot_pl.fit import run

    cfg = tiny_fit_config(demo_shards["train"], tmp_path, 2, optim={"warmup_iters": 1})
    result = run(cfg)
    assert result["head_folder"] == str(tmp_path / "head")
    _assert_same(load_head(tmp_path / "head"), load_head(tmp_path / "head.pt"))
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["training"]["steps"] == 2 and config["training"]["data"] == ["demo_train"]
    assert config["backbones"]["sam"] == "tiny" and config["backbones"]["clip"] == "clip_tiny"
    # the pair is the shards' one, recorded in both files
    clip_id = json.loads((demo_shards["train"] / "manifest.json").read_text())["backbones"]["clip"]["id"]
    assert config["backbones"]["clip_id"] == clip_id
    scale = json.loads((demo_shards["train"] / "manifest.json").read_text())["backbones"]["clip"]["logit_scale"]
    assert config["logit_scale"] == scale == pytest.approx(100.0, rel=1e-6)  # the tiny CLIP's exp(log 100)
    assert load_head(tmp_path / "head.pt").backbones == load_head(tmp_path / "head").backbones == config["backbones"]


def test_the_head_is_a_hub_model_and_a_loaded_folder_saves_back_the_same(tmp_path, monkeypatch):
    """RegionSpotHead gets save_pretrained/from_pretrained from huggingface_hub's ModelHubMixin;
    a head read from a folder keeps the folder's facts when saved again (what push_to_hub uploads)."""
    assert issubclass(RegionSpotHead, ModelHubMixin)
    head = _head(seed=3)
    facts = {"variant": "mine", "training": {"data": ["demo_train"], "steps": 7}, "metrics": {"val/AP": 0.5}}
    first = save_pretrained(head, tmp_path / "first", **facts)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    loaded = RegionSpotHead.from_pretrained(first)
    _assert_same(loaded, head)
    assert loaded.variant == "mine" and not loaded.training
    loaded.save_pretrained(tmp_path / "second")
    for name in ("config.json", "README.md"):
        assert (tmp_path / "second" / name).read_text() == (first / name).read_text(), name
    assert "| val/AP | 0.5000 |" in str(loaded.generate_model_card())
    _assert_same(load_pretrained(tmp_path / "second"), head)


def test_a_hub_id_that_cannot_be_fetched_is_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="'someone/no-such-head' is no local file or folder"):
        RegionSpotHead.from_pretrained("someone/no-such-head", local_files_only=True, cache_dir=tmp_path)
