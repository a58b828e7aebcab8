"""Training on cached features: learning, schedule, resume, DDP, mixing, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tiny_fit import TINY_MODEL, tiny_fit_config

from regionspot_pl import RegionSpotHead, load_head, save_head
from regionspot_pl.backbones.common import resolved_precision
from regionspot_pl.cache.manifest import ClipBackbone
from regionspot_pl.cache.shards import ShardFormatError, iter_samples, list_shards
from regionspot_pl.data.annotations import AnnotationError
from regionspot_pl.fit import COMMAND, FitError, ModelConfig, main, run
from regionspot_pl.model.head import VARIANTS, HeadMismatchError
from regionspot_pl.train.datamodule import (
    DataConfig,
    MixedBatches,
    RegionBatch,
    RegionDataModule,
    ShardStream,
    collate_regions,
    shards_for_epoch,
)
from regionspot_pl.train.module import OptimConfig, RegionSpotModule, lr_factor
from regionspot_pl.train.run import resolve_precision, size_head


def _cfg(shards, out, steps, val=True, **optim):
    data = {"val_shards": str(shards["val"]), "val_annotations": str(shards["val_json"])} if val else {}
    optim = {"warmup_iters": 5, "schedule_steps": steps, **optim}
    return tiny_fit_config(shards["train"], out, steps, data=data, optim=optim)


@pytest.fixture(scope="module")
def shards(demo_shards, demo_data):
    return {**demo_shards, "val_json": demo_data["val_json"]}


def _losses(out: Path) -> list[float]:
    rows = []
    for log in sorted(Path(out).glob("logs/version_*/metrics.csv")):
        rows += [float(r["train/loss"]) for r in csv.DictReader(log.open()) if r.get("train/loss")]
    return rows


def test_schedule_matches_the_paper_at_its_milestones():
    paper = OptimConfig().for_run(450_000)
    assert paper["warmup_iters"] == 1000 and paper["milestones"] == [350_000, 420_000]

    def factor(step):
        return lr_factor(step, paper["warmup_iters"], paper["warmup_factor"], paper["milestones"], paper["gamma"])

    assert factor(0) == pytest.approx(0.01)
    assert factor(500) == pytest.approx(0.505)
    assert factor(1000) == 1.0 and factor(349_999) == 1.0
    assert factor(350_000) == pytest.approx(0.1) and factor(419_999) == pytest.approx(0.1)
    assert factor(420_000) == pytest.approx(0.01) and factor(449_999) == pytest.approx(0.01)
    module = RegionSpotModule(head=RegionSpotHead(clip_dim=16, text_dim=8, ffn_dim=16).config.to_dict())
    opt = module.configure_optimizers()
    optimizer, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert optimizer.defaults["lr"] == 2.5e-5 and optimizer.defaults["weight_decay"] == 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-7)  # warm-up starts at 0.01 x lr
    for _ in range(1000):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-5)


SCHEDULE_KEYS = ("warmup_iters", "warmup_factor", "milestones", "gamma")


@pytest.mark.parametrize(
    ("max_steps", "warmup", "milestones"),
    [(3000, 7, [2333, 2800]), (1500, 3, [1167, 1400]), (900_000, 2000, [700_000, 840_000])],
)
def test_schedule_keeps_the_papers_shape_at_any_length(max_steps, warmup, milestones):
    run = OptimConfig().for_run(max_steps)
    assert run["warmup_iters"] == warmup and run["milestones"] == milestones
    # the same curve, compressed: the factor at the same fraction of the run is the paper's
    paper = OptimConfig().for_run(450_000)
    for fraction in (0.5, 0.8, 0.95):
        at_run = lr_factor(int(fraction * max_steps), **{k: run[k] for k in SCHEDULE_KEYS})
        at_paper = lr_factor(int(fraction * 450_000), **{k: paper[k] for k in SCHEDULE_KEYS})
        assert at_run == pytest.approx(at_paper)


def test_overfits_a_tiny_set_and_exports_a_head(shards, tmp_path):
    result = run(_cfg(shards, tmp_path, steps=120, warmup_iters=10))
    losses = _losses(tmp_path)
    assert len(losses) >= 100
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first / 10, (first, last)
    head = load_head(result["head"])
    assert head.config.clip_dim == 128 and head.config.text_dim == 64
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= result["metrics"]["val/AP"] <= 1.0


def test_resume_restores_step_optimizer_and_schedule(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, steps=6, val=False)
    cfg["trainer"]["val_every"] = 3
    run(cfg)
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6
    cfg["trainer"]["max_steps"], cfg["resume"] = 10, "last"
    run(cfg)
    second = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["global_step"] == 10
    assert second["lr_schedulers"][0]["last_epoch"] == 10
    state = second["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 10 for s in state.values())  # Adam moments carried over, not restarted
    losses = _losses(tmp_path)
    assert len(losses) == 10  # two logs, one per start: nothing overwritten


def test_ddp_two_processes_on_cpu_see_disjoint_samples(shards, tmp_path):
    # 24 train images in 6 shards of 4: each rank gets 3 shards = 12 images = 6 batches of 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[1] / "ddp_fit.py"),
            str(shards["train"]),
            str(shards["val"]),
            str(shards["val_json"]),
            str(tmp_path),
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [json.loads((tmp_path / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 12
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 24  # none dropped
    assert load_head(tmp_path / "head.pt").config.clip_dim == 128


def test_shard_split_is_disjoint_and_complete():
    shards = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        got = [s for r in range(2) for w in range(2) for s in shards_for_epoch(shards, epoch, 0, r, 2, w, 2, True)]
        assert sorted(got) == sorted(shards)
    assert shards_for_epoch(shards, 0, 0, 0, 1, 0, 1, True) != shards_for_epoch(shards, 1, 0, 0, 1, 0, 1, True)


def test_mixing_follows_the_configured_weights(shards):
    train = [str(p) for p in list_shards(shards["train"])]
    streams = [ShardStream(train, 0, seed=1), ShardStream(train, 1, seed=2)]
    batches = MixedBatches(streams, [3.0, 1.0], batch_size=2, max_boxes=3, seed=0)
    drawn = [b.dataset_index for _, b in zip(range(400), batches)]
    assert abs(np.mean(np.array(drawn) == 0) - 0.75) < 0.06
    batch = next(iter(batches))
    assert batch.valid.sum(1).max() <= 3  # the cap on boxes per image
    with pytest.raises(ValueError, match=r"mix_weights \[1.0\] are invalid: give 2"):
        MixedBatches(streams, [1.0], 2, None, 0)


def test_padding_and_batch_layout(shards):
    dm = RegionDataModule(DataConfig([str(shards["train"])], batch_size=4, workers=0))
    batch = next(iter(dm.train_dataloader()))
    n = batch.valid.sum(1)
    assert batch.sam.shape[:2] == batch.labels.shape == batch.valid.shape
    assert (batch.labels[~batch.valid] == -1).all() and n.max() == batch.sam.shape[1]
    assert batch.clip.shape[1:] == (197, 128) and batch.clip.dtype == torch.float16


def test_collate_keeps_every_value_caps_boxes_and_packs_one_storage(shards):
    samples = [s | {"dataset_index": 0} for s in iter_samples(list_shards(shards["train"])[:2])][:5]
    batch = collate_regions(samples)
    storages = {getattr(batch, k).untyped_storage().data_ptr() for k in RegionBatch.TENSORS}
    assert len(storages) == 1  # one shared-memory segment per batch when sent from a loader worker
    for i, s in enumerate(samples):
        k = len(s["labels"])
        np.testing.assert_array_equal(batch.sam[i, :k].numpy(), s["sam"].astype(np.float32))
        np.testing.assert_array_equal(batch.clip[i].numpy(), s["clip"])
        np.testing.assert_array_equal(batch.boxes[i, :k].numpy(), s["boxes"])
        np.testing.assert_array_equal(batch.labels[i, :k].numpy(), s["labels"])
        np.testing.assert_array_equal(batch.scores[i, :k].numpy(), s["scores"])
        assert batch.valid[i].sum() == k and (batch.labels[i, k:] == -1).all() and (batch.sam[i, k:] == 0).all()
        assert batch.meta[i]["kept"] is None and batch.meta[i]["key"] == s["__key__"]
    capped = collate_regions(samples, max_boxes=2, rng=np.random.default_rng(0))
    assert capped.sam.shape[1] == 2 and capped.valid.all()
    for i, s in enumerate(samples):
        kept = capped.meta[i]["kept"] or list(range(len(s["labels"])))
        np.testing.assert_array_equal(capped.boxes[i, : len(kept)].numpy(), s["boxes"][kept])


def test_bad_input_is_refused_with_the_cause(shards, tmp_path, capsys, caplog):
    with pytest.raises(ShardFormatError, match="shard folder not found"):
        RegionDataModule(DataConfig([str(tmp_path / "nowhere")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(shards["train"] / "manifest.json", empty)
    with pytest.raises(ShardFormatError, match="no .tar shards"):
        RegionDataModule(DataConfig([str(empty)]))
    # validation annotations of another vocabulary
    other = tmp_path / "other.json"
    gt = json.loads(Path(shards["val_json"]).read_text())
    gt["categories"] = sorted(gt["categories"], key=lambda c: c["id"])[:5]
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in {c["id"] for c in gt["categories"]}]
    other.write_text(json.dumps(gt))
    cfg = _cfg(shards, tmp_path / "a", steps=2)
    cfg["data"]["val_annotations"] = str(other)
    with pytest.raises(AnnotationError, match="5 categories"):
        run(cfg)
    # a published variant on shards from another CLIP
    cfg = _cfg(shards, tmp_path / "b", steps=2)
    cfg["model"] = {"variant": "BL"}
    with pytest.raises(HeadMismatchError, match="use a head trained on this CLIP"):
        run(cfg)
    # starting from a head of other sizes
    wrong = save_head(RegionSpotHead(clip_dim=128, text_dim=64, ffn_dim=32, num_heads=4), tmp_path / "wrong.pt")
    cfg = _cfg(shards, tmp_path / "c", steps=2)
    cfg["init_from"] = str(wrong)
    with pytest.raises(FitError, match="same variant"):
        run(cfg)
    # more readers than shards: the workers are capped, with a warning
    dm = RegionDataModule(DataConfig([str(shards["train"])], workers=8))
    with caplog.at_level("WARNING", logger="regionspot_pl.data"):
        assert dm.train_workers(world=1) == 6 and dm.train_workers(world=2) == 3
    assert "--data.workers 8 capped at 3" in caplog.text
    with pytest.raises(ShardFormatError, match="fewer than the 7 ranks"):
        dm.train_workers(world=7)
    # the CLI reports instead of a traceback
    nowhere = str(tmp_path / "nowhere")
    assert main(["--stage", "warmup", "--data.train_shards", f"[{nowhere}]", "--out", str(tmp_path / "e")]) == 2
    assert "shard folder not found" in capsys.readouterr().err
    assert (
        main(
            [
                "--stage",
                "warmup",
                "--model.variant",
                "auto",
                "--data.train_shards",
                f"[{shards['train']}]",
                "--resume",
                "last",
                "--out",
                str(tmp_path / "f"),
                "--data.val_shards",
                str(shards["val"]),
                "--data.val_annotations",
                str(shards["val_json"]),
            ]
        )
        == 2
    )
    assert "cannot resume" in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    cfg = _cfg(shards, tmp_path / "g", steps=2, val=False)
    cfg["resume"] = str(garbage)
    with pytest.raises(FitError, match="not a readable Lightning checkpoint"):
        run(cfg)


def test_stage_configs_resolve():
    warm = COMMAND.parse(
        ["--stage", "warmup", "--trainer.max_steps", "7", "--trainer.devices", "2", "--model.variant", "BL"]
    )
    assert warm.model.variant == "BL" and warm.trainer.max_steps == 7 and warm.trainer.devices == 2
    assert warm.optim.lr == 2.5e-5 and warm.optim.milestones == [350000, 420000]
    assert warm.data.train_shards == ["cache/shards/o365"]
    adv = COMMAND.parse(["--stage", "advanced"])
    assert adv.init_from == "runs/warmup/head.pt" and len(adv.data.train_shards) == 3
    assert adv.model.variant == "auto" and adv.trainer.max_steps == 450_000


def test_shards_stream_from_urls_listed_beside_the_manifest(shards, tmp_path):
    """A cluster keeps the manifest locally and streams the tars (here through `pipe:cat`)."""
    remote = tmp_path / "remote"
    shutil.copytree(shards["train"], remote)
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(remote / "manifest.json", local)
    names = sorted(p.name for p in remote.glob("*.tar"))
    stem = names[0].rsplit("-", 1)[0]
    (local / "shards.txt").write_text(f"# streamed\npipe:cat {remote}/{stem}-{{000000..{len(names) - 1:06d}}}.tar\n")
    dm = RegionDataModule(DataConfig([str(local)], batch_size=4, workers=0))
    assert len(dm.train[0].shards) == len(names) and dm.train[0].shards[0].startswith("pipe:cat ")
    seen = set()
    for batch, _ in zip(dm.train_dataloader(), range(6)):  # 24 images = 6 batches of 4: one epoch
        seen |= {m["key"] for m in batch.meta}
    assert len(seen) == 24


def test_advanced_stage_mixes_datasets_with_their_own_vocabularies(shards, tmp_path):
    """Two folders, two vocabularies: each batch is scored against its own dataset's texts."""
    other = tmp_path / "renamed"
    shutil.copytree(shards["val"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["vocabulary"]["names"] = [f"thing number {i}" for i in range(len(manifest["vocabulary"]["names"]))]
    manifest["dataset"] = "renamed"
    (other / "manifest.json").write_text(json.dumps(manifest))
    init = save_head(
        RegionSpotHead(clip_dim=128, text_dim=64, **{k: v for k, v in TINY_MODEL.items() if k != "variant"}),
        tmp_path / "warmup_head.pt",
    )
    cfg = _cfg(shards, tmp_path / "run", steps=4, val=False, lr=0.0)
    cfg["data"] |= {"train_shards": [str(shards["train"]), str(other)], "mix_weights": [1.0, 1.0], "workers": 0}
    cfg["init_from"] = str(init)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch.dataset_index)

    result = run(cfg, callbacks=[Spy()])
    assert set(seen) == {0, 1} and len(seen) == 4  # both datasets drawn (seeded)
    # lr 0: the exported head is exactly the warm-up head it started from
    start, end = load_head(init).state_dict(), load_head(result["head"]).state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)
    # the renamed vocabulary got its own text embeddings in the cache
    from regionspot_pl.backbones.clip import text_embeddings

    a = text_embeddings(
        None, manifest["vocabulary"]["names"], shards["text_cache"], manifest["backbones"]["clip"]["id"]
    )
    assert a.shape == (40, 64)


@pytest.mark.parametrize(
    ("dims", "asked", "variant"),
    [
        ((1024, 768, 224), "auto", "BL"),
        ((1024, 768, 336), "auto", "BL@336"),
        ((768, 512, 224), "auto", "BB"),
        ((128, 64, 224), "auto", None),
        ((1152, 1152, 384), "auto", None),  # SigLIP so400m: text dim = map width
        ((1280, 1024, 224), "auto", None),  # MetaCLIP 2 ViT-H/14
        ((1024, 768, 224), "BL", "BL"),
        ((36, 24, 224), "auto", None),  # a width 8 heads do not divide: 6 heads
    ],
)
def test_head_is_sized_to_the_shards_clip(dims, asked, variant):
    clip = ClipBackbone("some/clip", "id", dims[2], 257, dims[0], dims[1], 100.0)
    config, got = size_head(ModelConfig(asked), clip)
    assert got == variant and (config.clip_dim, config.text_dim) == dims[:2]
    if variant:
        assert config == VARIANTS[variant]
    else:  # as many heads as divide the width, at most the published 8
        assert config.num_heads == max(h for h in range(1, 9) if dims[0] % h == 0)
        RegionSpotHead(**config.to_dict())  # builds: nn.MultiheadAttention accepts the sizes


def test_a_variant_that_does_not_fit_names_the_one_that_does():
    clip = ClipBackbone("clip-vit-base-patch16", "id", 224, 197, 768, 512, 100.0)
    with pytest.raises(HeadMismatchError, match="the BL head expects .* width 1024.*use the BB head"):
        size_head(ModelConfig("BL"), clip)
    with pytest.raises(FitError, match="published sizes"):
        size_head(ModelConfig("auto", ffn_dim=64), clip)


def test_one_shard_and_the_stage_defaults_train_with_the_workers_capped(shards, tmp_path, caplog):
    """The new-user case: a training folder of one shard, the warmup stage's 4 loader workers."""
    one = tmp_path / "one_shard"
    one.mkdir()
    first = list_shards(shards["train"])[0]
    for path in (first, first.with_suffix(".json"), shards["train"] / "manifest.json"):
        shutil.copy(path, one)
    argv = ["--stage", "warmup", "--data.train_shards", f"[{one}]", "--data.val_shards", str(shards["val"])]
    argv += [
        "--data.val_annotations",
        str(shards["val_json"]),
        "--trainer.max_steps",
        "3",
        "--out",
        str(tmp_path / "run"),
    ]
    with caplog.at_level("WARNING", logger="regionspot_pl.data"):
        assert main([*argv, "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]) == 0
    assert "--data.workers 4 capped at 1" in caplog.text
    summary = json.loads((tmp_path / "run" / "fit_summary.json").read_text())
    assert summary["variant"] == "custom" and "val/AP" in summary["metrics"]
    assert json.loads((tmp_path / "run" / "head" / "config.json").read_text())["variant"] == "custom"


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"), [(False, False, "32-true"), (True, True, "bf16-mixed"), (True, False, "16-mixed")]
)
def test_auto_precision_is_the_extractions_reading_in_lightnings_names(monkeypatch, cuda, bf16, expected):
    """fit's 'auto' is backbones.common.resolved_precision's: bf16 where the card has it, fp16
    (with loss scaling) on others, fp32 without a GPU; a named precision passes as it is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("16-true", "auto") == "16-true"
    device = torch.device("cuda" if cuda else "cpu")
    assert expected.startswith({"fp32": "32", "fp16": "16", "bf16": "bf16"}[resolved_precision(device, "auto")])
