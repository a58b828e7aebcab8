"""Bad input to ``python -m regionspot_pl.extract`` ends in one ``error:`` line naming the flag or
the file, and exit code 2: never a traceback. Every case runs ``main`` in process on the demo data
and the tiny backbones of tests/conftest.py."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import Siglip2Config

from regionspot_pl.cache.manifest import MANIFEST
from regionspot_pl.config import ConfigError
from regionspot_pl.extract.cli import main
from regionspot_pl.extract.run import LOCK, ExtractConfig, run_extraction
from regionspot_pl.utils.checks import SettingError
from regionspot_pl.utils.io import FolderLock


@pytest.fixture
def ctx(demo_data, tiny_backbones, tmp_path, monkeypatch) -> SimpleNamespace:
    """The flags of a good two-image extraction (``ctx.flags``, None drops a flag) and what a case needs."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    flags = {
        "--images": demo_data["val_images"],
        "--annotations": demo_data["val_json"],
        "--out": tmp_path / "out",
        "--sam_type": "tiny",
        "--sam_checkpoint": tiny_backbones["sam_checkpoint"],
        "--clip_model": tiny_backbones["clip_dir"],
        "--workers": 0,
        "--limit": 2,
        "--text_cache": tmp_path / "text.h5",
    }
    return SimpleNamespace(flags=flags, tmp=tmp_path, monkeypatch=monkeypatch, demo_data=demo_data, tiny=tiny_backbones)


def _argv(flags: dict) -> list[str]:
    return [str(word) for flag, value in flags.items() if value is not None for word in (flag, value)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _yaml(ctx, data: dict) -> Path:
    return _write(ctx.tmp / "extract.yaml", yaml.safe_dump(data))


# Bad flag values: (flags set, fragments of the error line); --limit 2 extracts two images.
FLAG_CASES = {
    "shard_size_zero": ({"--shard_size": 0}, ("--shard_size is 0", ">= 1")),
    "read_timeout_zero": ({"--read_timeout": 0}, ("--read_timeout is 0.0", ">= 1")),
    "read_timeout_infinite": ({"--read_timeout": ".inf"}, ("--read_timeout is inf", "finite")),
    "unknown_precision": ({"--precision": "fp8"}, ("--precision", "bf16")),
    "clip_size_not_positive": ({"--clip_size": 0}, ("--clip_size is 0", ">= 1")),
    "rank_outside_world_size": ({"--rank": 2, "--world_size": 2}, ("--rank 2", "--world_size 2")),
    "rank_with_no_image": ({"--rank": 2, "--world_size": 3}, ("rank 2 of 3 gets no image", "--world_size")),
    "device_not_a_device": ({"--device": "gpu"}, ("--device 'gpu'",)),
    "device_this_machine_lacks": ({"--device": "cuda:99"}, ("--device cuda:99",)),
    "sam_type_of_another_checkpoint": ({"--sam_type": "vit_b"}, ("--sam_type vit_b", "sam_tiny.pth")),
    "clip_size_of_another_model": ({"--clip_size": 336}, ("--clip_size 336 does not match", "224")),
    "old_flag_spelling": ({"--shard-size": 4}, ("unrecognized arguments: --shard-size",)),
}


# Each case edits ctx.flags (or the files they name) into one bad input and returns the
# fragments the error line must hold.
CASES: dict[str, Callable[[SimpleNamespace], tuple[str, ...]]] = {}


def case(fn: Callable[[SimpleNamespace], tuple[str, ...]]) -> Callable:
    CASES[fn.__name__] = fn
    return fn


@case
def missing_required_flags(ctx):
    ctx.flags["--images"] = ctx.flags["--clip_model"] = None
    return ("missing --images, --clip_model",)


@case
def unknown_yaml_key(ctx):
    ctx.flags["--config"] = _yaml(ctx, {"shard_sise": 4})
    return ("unknown key 'shard_sise' in", "extract.yaml", "shard_size")


@case
def wrong_yaml_type(ctx):
    ctx.flags["--config"] = _yaml(ctx, {"shard_size": "big"})
    return ("--shard_size must be an integer, got big", "extract.yaml")


@case
def yaml_not_a_mapping(ctx):
    ctx.flags["--config"] = _write(ctx.tmp / "extract.yaml", "- images\n- out\n")
    return ("extract.yaml", "must hold a mapping")


@case
def rank_environment_not_a_number(ctx):
    ctx.monkeypatch.setenv("RANK", "first")
    return ("$RANK", "'first'")


@case
def annotation_file_missing(ctx):
    ctx.flags["--annotations"] = ctx.tmp / "nope.json"
    return ("--annotations", "nope.json", "not found")


@case
def annotation_file_not_json(ctx):
    ctx.flags["--annotations"] = _write(ctx.tmp / "broken.json", '{"images": [')
    return ("broken.json", "not valid JSON")


@case
def annotation_file_not_coco(ctx):
    ctx.flags["--annotations"] = _write(ctx.tmp / "list.json", "[1, 2]")
    return ("list.json", "not a COCO-format annotation file")


@case
def image_file_name_null(ctx):
    gt = json.loads(Path(ctx.demo_data["val_json"]).read_text())
    gt["images"][0]["file_name"] = None  # a malformed record: not a missing image to skip
    ctx.flags["--annotations"] = _write(ctx.tmp / "nullname.json", json.dumps(gt))
    image_id = gt["images"][0]["id"]
    return ("nullname.json", f"image #0 (id {image_id})", "has file_name None", "as 'file_name'")


@case
def image_folder_missing(ctx):
    ctx.flags["--images"] = ctx.tmp / "no_images"
    return ("--images", "no_images", "not found")


@case
def image_folder_without_the_images(ctx):
    (ctx.tmp / "empty").mkdir()
    ctx.flags["--images"] = ctx.tmp / "empty"
    return ("--images", "empty", "none of the first 2 images")


@case
def proposals_of_the_wrong_format(ctx):
    ctx.flags["--boxes"] = _write(ctx.tmp / "props.json", json.dumps({"7": {"boxes": "none"}}))
    return ("props.json", "entry '7'")


@case
def sam2_checkpoint_of_another_size(ctx):
    ctx.flags["--sam_type"] = "sam2.1_hiera_t"
    ctx.flags["--sam_checkpoint"] = ctx.tiny["sam2_checkpoint"]
    return ("sam2.1_hiera_tiny_random.pt", "--sam_type sam2.1_hiera_t", "does not fit", "no packaged SAM 2.1 type")


@case
def sam2_config_missing(ctx):
    ctx.flags["--sam_type"] = ctx.tmp / "sam2_custom.yaml"
    ctx.flags["--sam_checkpoint"] = ctx.tiny["sam2_checkpoint"]
    return ("sam2_custom.yaml", "not found", "SAM 2 model config")


@case
def placeholder_paths_of_a_shipped_config(ctx):
    for flag in ("--images", "--annotations", "--sam_type", "--sam_checkpoint", "--clip_model", "--out"):
        ctx.flags[flag] = None
    ctx.flags["--preset"] = "o365"
    return ("--images /data/objects365/train", "not found", "pass the right path as --images")


@case
def out_is_a_file(ctx):
    ctx.flags["--out"] = _write(ctx.tmp / "out.txt", "")
    return ("--out", "out.txt", "not a folder")


@case
def out_holds_another_format(ctx):
    (ctx.tmp / "out").mkdir()
    _write(ctx.tmp / "out" / MANIFEST, json.dumps({"format_version": 99, "protocol": "reference-v1"}))
    return ("--out", "cache format 99", "another --out")


@case
def text_cache_not_hdf5(ctx):
    ctx.flags["--text_cache"] = _write(ctx.tmp / "text.h5", "not hdf5")
    return ("--text_cache", "text.h5", "not an HDF5 file")


@case
def sam_checkpoint_missing(ctx):
    ctx.flags["--sam_checkpoint"] = ctx.tmp / "nope.pth"
    return ("--sam_checkpoint", "nope.pth", "sam_tiny.pth")


@case
def sam_checkpoint_not_sam(ctx):
    torch.save({"weight": torch.zeros(2)}, ctx.tmp / "other.pth")
    ctx.flags["--sam_checkpoint"] = ctx.tmp / "other.pth"
    return ("other.pth", "not a SAM state dict")


@case
def sam_checkpoint_not_a_checkpoint(ctx):
    ctx.flags["--sam_checkpoint"] = _write(ctx.tmp / "text.pth", "hello")
    return ("text.pth", "could not be read as a SAM state dict")


@case
def clip_folder_not_clip(ctx):
    (ctx.tmp / "bert").mkdir()
    _write(ctx.tmp / "bert" / "config.json", json.dumps({"model_type": "bert"}))
    ctx.flags["--clip_model"] = ctx.tmp / "bert"
    return ("bert", "is not a CLIP directory", "supported model_types: 'clip', 'metaclip_2', 'siglip'")


@case
def clip_folder_naflex_siglip2(ctx):
    Siglip2Config().save_pretrained(ctx.tmp / "naflex")
    ctx.flags["--clip_model"] = ctx.tmp / "naflex"
    return ("naflex", "model_type 'siglip2'", "NaFlex", "fixed-resolution SigLIP 2")


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_bad_flag_value_is_one_error_line(name, ctx, cli_error):
    flags, fragments = FLAG_CASES[name]
    cli_error(main, _argv({**ctx.flags, **flags}), *fragments)
    assert not list((ctx.tmp / "out").glob("*.tar"))  # nothing extracted


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line(name, ctx, cli_error):
    fragments = CASES[name](ctx)
    cli_error(main, _argv(ctx.flags), *fragments)
    assert not list((ctx.tmp / "out").glob("*.tar"))  # nothing extracted


def test_an_out_holding_another_extraction_and_a_locked_out_are_refused(ctx, cli_error):
    argv = _argv(ctx.flags)
    assert main([*argv, "--shard_size", "2"]) == 0
    cli_error(main, [*argv, "--shard_size", "1"], "differs in: shard_size", "another --out")
    with FolderLock(ctx.tmp / "out" / LOCK.format(rank=0), "extraction folder"):  # a live run of rank 0
        cli_error(main, [*argv, "--shard_size", "2"], str(ctx.tmp / "out"), f"process {os.getpid()}")


def test_a_config_built_in_code_is_checked_like_the_flags(ctx):
    cfg = ExtractConfig(**{k[2:]: str(v) for k, v in ctx.flags.items() if k not in ("--limit", "--workers")})
    with pytest.raises(SettingError, match="^shard_size is 0; it must be >= 1$"):
        ExtractConfig(**{**vars(cfg), "shard_size": 0})
    cfg.workers, cfg.shard_size = 0, 0  # set after the settings were made: checked when they run
    with pytest.raises(SettingError, match="^shard_size is 0"):
        run_extraction(cfg)


def test_what_extract_raises_for_bad_input_is_a_region_spot_error():
    """run_command turns only RegionSpotError into an error: line: every error extract lets
    through for bad input must be one."""
    from regionspot_pl.backbones.common import BackboneError, BackboneNotFoundError
    from regionspot_pl.backbones.image import ImageReadError
    from regionspot_pl.cache.shards import ShardFormatError
    from regionspot_pl.data.annotations import AnnotationError
    from regionspot_pl.errors import RegionSpotError
    from regionspot_pl.extract.run import ExtractError
    from regionspot_pl.utils.io import FolderLockError

    for error in (ExtractError, AnnotationError, BackboneError, BackboneNotFoundError, ImageReadError):
        assert issubclass(error, RegionSpotError), error
    assert issubclass(FolderLockError, RegionSpotError) and issubclass(ShardFormatError, RegionSpotError)
    assert issubclass(ConfigError, RegionSpotError) and issubclass(SettingError, RegionSpotError)
