"""A cluster can stop a run: SIGTERM (SLURM, Kubernetes) and SIGINT stop `extract` and `fit`
within seconds, and the rerun reaches what an uninterrupted run reaches."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from tiny_fit import tiny_fit_config
from torch.utils.data import DataLoader, IterableDataset

from regionspot_pl.cache.shards import iter_samples, list_shards
from regionspot_pl.extract.run import ExtractConfig, run_extraction
from regionspot_pl.fit import run
from regionspot_pl.train.graceful_stop import GracefulStop
from regionspot_pl.utils.stopping import Stopped, stop_on_signals

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# SLURM (KillWait) and Kubernetes (terminationGracePeriodSeconds) send SIGKILL 30 s after SIGTERM
# by default: a stop must be over by then, on any machine.
CLUSTER_GRACE_S = 30
# a bound on reaching a point a few batches into a run, there only so that a broken run fails
# instead of hanging; minutes, so that a slow machine never meets it
START_TIMEOUT_S = 300

# `python -m regionspot_pl.extract ARGS`, except that the second batch waits (up to 600 s) after
# touching the file $HELD: the first shard is finished, the others are not, and they cannot be
# finished before the test's signal comes, however fast the machine.
HELD_EXTRACT = """
import os, sys, time
from pathlib import Path
from regionspot_pl.extract import cli, features

encode, calls = features.FeatureExtractor.encode, []

def held_encode(self, items):
    calls.append(len(items))
    if len(calls) == 2:
        Path(os.environ["HELD"]).touch()
        time.sleep(600)
    return encode(self, items)

features.FeatureExtractor.encode = held_encode
sys.exit(cli.main(sys.argv[1:]))
"""


def _wait_for(condition, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    """Poll until ``condition()``; fail early (with its output) if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before it could be stopped:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run made no progress in time")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, signum: int) -> str:
    """Send ``signum``; the process must exit within the clusters' grace period. Returns its stderr."""
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=CLUSTER_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not stop within {CLUSTER_GRACE_S} s of the signal")
    return err


def _samples(folder) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(list_shards(folder))}


def _same(a: dict, b: dict) -> bool:
    return (
        all(np.array_equal(a[k], b[k]) for k in ("sam", "boxes", "labels", "scores", "clip")) and a["meta"] == b["meta"]
    )


def _extract_config(demo_data, tiny_backbones, out: Path, text_cache: Path) -> dict:
    """Six images in three shards of two, a batch per shard."""
    return {
        "images": demo_data["val_images"],
        "annotations": demo_data["val_json"],
        "out": out,
        "sam_type": "tiny",
        "sam_checkpoint": tiny_backbones["sam_checkpoint"],
        "clip_model": tiny_backbones["clip_dir"],
        "dataset": "demo_val",
        "shard_size": 2,
        "limit": 6,
        "workers": 0,
        "batch_size": 2,
        "text_cache": text_cache,
    }


def _run_extraction(flags: dict) -> dict:
    return run_extraction(ExtractConfig(**{k: v if isinstance(v, int) else str(v) for k, v in flags.items()}))


def test_sigterm_stops_extract_and_the_rerun_completes_it_as_an_uninterrupted_run(demo_data, tiny_backbones, tmp_path):
    out, held = tmp_path / "out", tmp_path / "held"
    flags = _extract_config(demo_data, tiny_backbones, out, tmp_path / "text.h5")
    argv = [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_EXTRACT, *argv],
        env={**ENV, "HELD": str(held)},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(held.is_file, proc)  # in its second batch
    err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM: the finished shards are kept" in err and "Traceback" not in err
    assert len(list(out.glob("*.tar"))) == 1  # the first batch's shard, and only it
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.lock"))  # cleaned up, folder released

    summary = _run_extraction(flags)
    assert summary["resumed_images"] == 2 and summary["images"] == 4
    # the same command never stopped: the same batches, so the same numbers to the last bit
    uninterrupted = _run_extraction({**flags, "out": tmp_path / "uninterrupted"})
    assert uninterrupted["images"] == 6
    resumed, expected = _samples(out), _samples(tmp_path / "uninterrupted")
    assert len(resumed) == 6 and resumed.keys() == expected.keys()
    assert all(_same(resumed[k], expected[k]) for k in resumed)


def _fit_cfg(shards: dict, out: Path, steps: int, **trainer) -> dict:
    return tiny_fit_config(shards["train"], out, steps, optim={"warmup_iters": 5}, trainer={"val_every": 2, **trainer})


def _consistent_step(ckpt_path: Path) -> int:
    """The checkpoint's step, after checking that optimizer and schedule stepped as often."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    step = ckpt["global_step"]
    assert ckpt["lr_schedulers"][0]["last_epoch"] == step
    assert all(int(s["step"]) == step for s in ckpt["optimizer_states"][0]["state"].values())
    return step


def _losses(out: Path) -> int:
    rows = 0
    for log in sorted(Path(out).glob("logs/version_*/metrics.csv")):
        rows += sum(1 for r in csv.DictReader(log.open()) if r.get("train/loss"))
    return rows


def test_sigterm_stops_fit_at_a_step_boundary_and_resume_continues_it(demo_shards, tmp_path):
    out = tmp_path / "fit"
    cfg = _fit_cfg(demo_shards, out, steps=10**9)  # never ends by itself, however fast the machine
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "regionspot_pl.fit", "--config", str(tmp_path / "fit.yaml")],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    last = out / "checkpoints" / "last.ckpt"
    _wait_for(last.is_file, proc)  # saved before the first validation, at step 2
    err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "continue with --resume last" in err
    step = _consistent_step(last)
    assert step >= 2 and not (out / "head.pt").exists()  # stopped, not finished
    assert _losses(out) == step  # every step done is logged and saved: none lost

    # resumed to 3 steps further: step, optimizer and schedule as an uninterrupted run of step + 3
    cfg["trainer"]["max_steps"], cfg["resume"] = step + 3, "last"
    run(cfg)
    assert _consistent_step(last) == step + 3 and _losses(out) == step + 3
    assert (out / "head.pt").is_file()


def test_sigint_during_fit_stops_at_the_step_boundary_with_a_checkpoint(demo_shards, tmp_path):
    class CtrlC(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # in the middle of Lightning's step: not a boundary yet

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stop:
        run(_fit_cfg(demo_shards, tmp_path / "fit", steps=1000, val_every=1000), callbacks=[CtrlC()])
    assert stop.value.signum == signal.SIGINT and stop.value.exit_code == 130
    assert "continue with --resume last" in str(stop.value)
    assert _consistent_step(tmp_path / "fit" / "checkpoints" / "last.ckpt") == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


# how long the stalled read below lasts: a stop that waited for it would take this long
STALL_S = 120


class _Numbers(IterableDataset):
    """Three batches, then a read that does not return for STALL_S (a stalled mount); SIGTERM
    comes as the stalled read begins."""

    def __iter__(self):
        for i in range(3):
            yield torch.full((2, 4), float(i))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STALL_S)


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(_Numbers(), batch_size=None, num_workers=0)


def test_a_stop_that_finds_no_step_boundary_interrupts_within_the_grace_period(tmp_path):
    stop = GracefulStop(tmp_path / "last.ckpt", grace_s=1.0)
    trainer = L.Trainer(
        max_steps=100,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[stop],
    )
    start = time.monotonic()
    with pytest.raises(Stopped) as err:
        with stop.guard():
            trainer.fit(_Linear())
    assert err.value.signum == signal.SIGTERM
    assert time.monotonic() - start < STALL_S  # interrupted in the read, not after it
    # Lightning reads one batch ahead, so the stalled read is the fourth, asked for before step 3
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2  # saved at the boundary


def test_stop_on_signals_raises_stopped_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as err:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert err.value.exit_code == 143 and str(err.value) == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
