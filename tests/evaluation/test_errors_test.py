"""Bad input to ``python -m regionspot_pl.test``: exit code 2, one ``error:`` line naming the file
or flag, no traceback. Every case reads the session's demo shards (tiny backbones, conftest.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_test_cli import _head

from regionspot_pl import test as test_cli
from regionspot_pl.model import load_head, save_head


class Case:
    """Everything a bad-input case may need: the good inputs and a scratch folder."""

    def __init__(self, demo_data: dict, demo_shards: dict, tiny: dict, tmp: Path) -> None:
        self.shards, self.annotations = demo_shards["val"], demo_data["val_json"]
        self.images, self.text_cache, self.clip = demo_data["val_images"], demo_shards["text_cache"], tiny["clip_dir"]
        self.tmp = tmp
        self.head = _head(tmp / "head.pt")

    def argv(self, *extra: object, shards: object = None, annotations: object = None, head: object = None) -> list:
        """A regionspot run on the demo val shards, with one input replaced or flags added."""
        return [
            *("--shards", shards or self.shards),
            *("--annotations", annotations or self.annotations),
            *("--head", head or self.head),
            *("--out", self.tmp / "out", "--device", "cpu", "--text_cache", self.text_cache),
            *extra,
        ]

    def baseline(self, method: str, *extra: object, shards: object = None) -> list:
        argv = ["--shards", shards or self.shards, "--annotations", self.annotations, "--method", method]
        return [*argv, "--out", self.tmp / "out", "--device", "cpu", "--workers", "0", *extra]

    def file(self, name: str, text: str) -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def manifest_copy(self, **changes: object) -> Path:
        """A copy of the shard folder whose manifest has ``changes`` (dotted keys into 'config')."""
        folder = self.tmp / "shards_copy"
        shutil.copytree(self.shards, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        for key, value in changes.items():
            if key.startswith("config_"):
                manifest["config"][key.removeprefix("config_")] = value
            else:
                manifest[key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    @property
    def clip_id(self) -> str:
        return json.loads((Path(self.shards) / "manifest.json").read_text())["backbones"]["clip"]["id"]

    def head_of_pair(self, sam: str, clip_id: str) -> Path:
        """The tiny head (sizes fit the shards), recorded as trained on another pair."""
        head = load_head(self.head)
        head.backbones = {"sam": sam, "clip": "clip_other", "clip_id": clip_id}
        return save_head(head, self.tmp / "pair.pt")

    def other_clip(self, projection_dim: int) -> Path:
        """A copy of the tiny CLIP whose config claims another text width."""
        other = self.tmp / "clip_other"
        shutil.copytree(self.clip, other)
        config = json.loads((other / "config.json").read_text())
        config["projection_dim"] = projection_dim
        (other / "config.json").write_text(json.dumps(config))
        return other

    def edited_annotations(self, name: str, edit: Callable[[dict], None]) -> Path:
        """A copy of the demo val GT, edited."""
        gt = json.loads(Path(self.annotations).read_text())
        edit(gt)
        return self.file(name, json.dumps(gt))

    def fewer_classes(self) -> tuple[list, tuple[str, ...]]:
        """The demo val GT without its last 10 categories (and their objects): a run refused
        naming the file, the shards and the classes it lacks."""

        def drop_ten(gt: dict) -> None:
            gt["categories"] = sorted(gt["categories"], key=lambda c: c["id"])[:-10]
            kept = {c["id"] for c in gt["categories"]}
            gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in kept]

        path = self.edited_annotations("fewer.json", drop_ten)
        cats = sorted(json.loads(Path(self.annotations).read_text())["categories"], key=lambda c: c["id"])
        first = cats[-10]
        named = (str(path), str(self.shards), "lacks 10 of the 40 classes", f"{first['name']} (id {first['id']})")
        return self.argv(annotations=path), (*named, "pass the annotation file the shards were extracted from")

    def null_file_name(self) -> tuple[list, tuple[str, ...]]:
        """The demo val GT with a null file_name: a malformed record, refused naming it."""
        image_id = json.loads(Path(self.annotations).read_text())["images"][0]["id"]
        path = self.edited_annotations("nullname.json", lambda gt: gt["images"][0].update(file_name=None))
        named = (str(path), f"image #0 (id {image_id})", "has file_name None", "as 'file_name'")
        return self.argv(annotations=path), named

    def foreign_annotations(self) -> Path:
        """The demo val GT with every image id moved, so no shard image is in it."""
        gt = json.loads(Path(self.annotations).read_text())
        for im in gt["images"]:
            im["id"] += 10_000
        for a in gt["annotations"]:
            a["image_id"] += 10_000
        return self.file("foreign.json", json.dumps(gt))


CASES: dict[str, Callable[[Case], tuple[list, tuple[str, ...]]]] = {
    "no shards given": lambda c: (["--annotations", c.annotations, "--head", c.head], ("--shards",)),
    "missing shard folder": lambda c: (c.argv(shards=c.tmp / "nope"), ("shard folder not found", "nope")),
    "folder without manifest": lambda c: (c.argv(shards=c.tmp), ("has no manifest.json", str(c.tmp))),
    "manifest of another format": lambda c: (c.argv(shards=c.manifest_copy(format_version=0)), ("cache format 0",)),
    "missing annotations": lambda c: (c.argv(annotations=c.tmp / "nogt.json"), ("annotation file not found", "nogt")),
    "annotations not JSON": lambda c: (c.argv(annotations=c.file("gt.json", "{")), ("gt.json", "not valid JSON")),
    "annotations not COCO": lambda c: (c.argv(annotations=c.file("gt.json", "[]")), ("gt.json", "not a COCO-format")),
    "annotations lacking classes of the shards": Case.fewer_classes,
    "annotations with a null file_name": Case.null_file_name,
    "annotations of other images": lambda c: (c.argv(annotations=c.foreign_annotations()), ("foreign.json", "not in")),
    "missing head": lambda c: (c.argv(head=c.tmp / "nohead.pt"), ("--head", "nohead.pt")),
    "head not a checkpoint": lambda c: (c.argv(head=c.file("head.txt", "hello")), ("--head", "head.txt")),
    "head of another CLIP width": lambda c: (c.argv(head=_head(c.tmp / "w.pt", clip_dim=96)), ("w.pt", "width 96")),
    "head of another SAM": lambda c: (
        c.argv(head=c.head_of_pair("vit_b", c.clip_id)),
        ("pair.pt", "SAM vit_b", "is given SAM tiny", c.clip_id),
    ),
    "head of another vision-language model of the same widths": lambda c: (
        c.argv(head=c.head_of_pair("tiny", "0123456789abcdef")),
        ("pair.pt", "0123456789abcdef", c.clip_id, "use a head trained on this pair"),
    ),
    "head of another text dim": lambda c: (c.argv(head=_head(c.tmp / "t.pt", text_dim=32)), ("t.pt", "text dim 32")),
    "clip model of another text dim": lambda c: (
        c.argv("--clip_model", c.other_clip(32)),
        ("--clip_model", "clip_other", "text dim 32"),
    ),
    "missing vocab file": lambda c: (c.argv("--vocab", c.tmp / "v.txt"), ("--vocab", "v.txt")),
    "vocab of the wrong length": lambda c: (
        c.argv("--vocab", c.file("v.txt", "cat\ndog\n")),
        ("--vocab", "v.txt", "2 class names"),
    ),
    "topk 0": lambda c: (c.argv("--topk", "0"), ("--topk is 0", ">= 1")),
    "topk not a number": lambda c: (c.argv("--topk", "many"), ("--topk", "many")),
    "batch size 0": lambda c: (c.argv("--batch_size", "0"), ("--batch_size is 0", ">= 1")),
    "workers -1": lambda c: (c.argv("--workers", "-1"), ("--workers", ">= 0")),
    "unknown method": lambda c: (c.argv("--method", "clip-sam"), ("--method", "clip-sam", "clip-box")),
    "unknown scoring": lambda c: (c.argv("--scoring", "TAP"), ("--scoring must be one of regionspot, tap, got TAP",)),
    "save_logits not a bool": lambda c: (c.argv("--save_logits", "maybe"), ("--save_logits", "maybe")),
    "unknown metric backend": lambda c: (c.argv("--metric_backend", "pycocotools"), ("--metric_backend",)),
    "unknown yaml key": lambda c: (
        ["--config", c.file("t.yaml", f"shards: {c.shards}\nbogus: 1\n")],
        ("bogus", "t.yaml", "valid keys"),
    ),
    "yaml value of a wrong type": lambda c: (["--config", c.file("t.yaml", "topk: lots\n")], ("topk", "t.yaml")),
    "yaml value out of range": lambda c: (["--config", c.file("t.yaml", "topk: 0\n")], ("--topk is 0", "t.yaml")),
    "unknown split": lambda c: (["--split", "no_such_split"], ("configs/test/no_such_split.yaml", "lvis_val")),
    "device that is no device": lambda c: (c.argv("--device", "gpu"), ("--device", "gpu")),
    "clip-mask on no-masks shards": lambda c: (
        c.baseline("clip-mask", shards=c.manifest_copy(config_masks=False)),
        ("clip-mask", "--masks false"),
    ),
    "baseline without images": lambda c: (c.baseline("clip-box", "--images", c.tmp / "noimg"), ("--images", "noimg")),
    "baseline with the wrong images": lambda c: (
        c.baseline("clip-box", "--images", c.tmp),
        ("image file not found", "--images"),
    ),
}


@pytest.fixture
def case(demo_data, demo_shards, tiny_backbones, tmp_path) -> Case:
    return Case(demo_data, demo_shards, tiny_backbones, tmp_path)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name, case, cli_error):
    argv, fragments = CASES[name](case)
    cli_error(test_cli.main, argv, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(case, cli_error):
    cli_error(test_cli.main, case.argv("--device", "cuda"), "--device cuda", "--device cpu")
