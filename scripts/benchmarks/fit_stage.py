"""Training from the cache end to end: ``python -m regionspot_pl.fit``'s own ``train`` (Lightning,
the shard reader with N workers, the head step) on a synthetic cache of RegionSpot-BL samples made
for a real CLIP folder, timed by a callback that also stops the run after a set time."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from regionspot_pl.backbones.build import load_vlm
from regionspot_pl.backbones.clip import text_embeddings
from regionspot_pl.backbones.text_cache import model_identity
from regionspot_pl.cache.manifest import ClipBackbone, Manifest
from regionspot_pl.train.run import train
from regionspot_pl.train.settings import DataConfig, FitConfig, TrainerConfig

from .bl_shards import sample_bytes, write_bl_shards
from .common import BL, now, sync


class Throughput(L.Callback):
    """Images per second of the training loop after ``warm_up`` steps (readers started, kernels
    chosen); asks the Trainer to stop ``seconds`` after that. Records the strategy and, under DDP,
    the process group's backend."""

    def __init__(self, warm_up: int, seconds: float) -> None:
        self.warm_up, self.seconds = warm_up, seconds
        self.start: float | None = None
        self.images, self.elapsed, self.strategy, self.backend = 0, 0.0, "", None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.strategy = type(trainer.strategy).__name__
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.backend = torch.distributed.get_backend()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.start is None:
            if batch_idx + 1 >= self.warm_up:
                sync(module.device)
                self.start = now()
            return
        self.images += len(batch.meta)
        if now() - self.start >= self.seconds:
            sync(module.device)
            self.elapsed = now() - self.start
            trainer.should_stop = True

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed if self.elapsed else math.nan


def synthetic_cache(
    folder: Path, clip_dir: Path, gigabytes: float, processes: int, classes: int = BL["classes"]
) -> Path:
    """At least ``gigabytes`` (1e9 bytes) of samples in the sizes of the CLIP in ``clip_dir`` (its
    token count and width) and its identity in the manifest, as extraction leaves them; the text
    file the manifest names is filled by :func:`cache_text_embeddings`."""
    vlm = load_vlm(clip_dir)
    clip = ClipBackbone(
        str(clip_dir.resolve()), model_identity(clip_dir), vlm.image_size, vlm.num_tokens, vlm.vision_dim,
        vlm.text_dim, vlm.logit_scale,
    )  # fmt: skip
    del vlm
    num_images = math.ceil(gigabytes * 1e9 / sample_bytes(clip))
    shard_size = max(1, min(1000, num_images // 16))  # extraction's 1000 per shard; 16+ shards for the readers
    text_file = str((folder.parent / f"{folder.name}_text.h5").resolve())
    return write_bl_shards(folder, num_images, shard_size, clip, text_file, processes, classes)


def cache_text_embeddings(folder: Path, device: torch.device) -> None:
    """The text embeddings of a synthetic cache's vocabulary, by its CLIP on ``device``, into the
    text file its manifest names (as extraction writes them): ``fit`` then reads it as a real cache."""
    manifest = Manifest.read(folder)
    vlm = load_vlm(manifest.clip.model).to(device).eval()
    with torch.inference_mode():
        text_embeddings(vlm, list(manifest.vocabulary.names), manifest.text_cache, manifest.clip.id)


def fit_rate(
    folder: Path, out: Path, workers: int, device: torch.device, seconds: float, strategy: str = "auto",
    batch: int = 16, warm_up: int = 20,
) -> Throughput:  # fmt: skip
    """``train`` on ``folder`` with ``workers`` readers, ``batch`` images a step, for ``seconds``
    after ``warm_up`` steps."""
    meter = Throughput(warm_up, seconds)
    steps = 10**7  # the meter stops the run; no checkpoint on the way (val_every = max_steps)
    cfg = FitConfig(
        out=str(out),
        data=DataConfig(train_shards=[str(folder)], batch_size=batch, workers=workers),
        trainer=TrainerConfig(
            max_steps=steps, val_every=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            strategy=strategy, enable_progress_bar=False,
        ),
    )  # fmt: skip
    train(cfg, callbacks=[meter])
    return meter
