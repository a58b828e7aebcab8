"""Training and validation data: batches of cached features, read from shards with webdataset.

Shards are dealt to DDP ranks, then to loader workers, after a per-epoch permutation that every
rank draws from the same seed: within an epoch each shard (so each sample) is read by exactly
one worker of one rank. Training streams are endless (the run is bounded by ``max_steps``), so
ranks with different sample counts never wait on each other at an epoch boundary.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache.manifest import ClipBackbone, ShardFolder
from ..cache.shards import ShardFormatError, decoded_samples
from .settings import DataConfig, DataConfigError

log = logging.getLogger("regionspot_pl.data")


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and world size (torch.distributed first, then torchrun's env)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shards_for_epoch(
    shards: list[str], epoch: int, seed: int, rank: int, world: int, worker: int, num_workers: int, shuffle: bool
) -> list[str]:
    """The shards one worker of one rank reads in one epoch (disjoint, covering all)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)) if shuffle else range(len(shards))
    ranked = [shards[i] for i in order][rank::world]
    return ranked[worker::num_workers]


def check_mix_weights(weights: list[float], count: int) -> None:
    """One finite, non-negative weight per training dataset, not all zero."""
    ok = (
        len(weights) == count
        and all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights)
        and sum(weights) > 0
    )
    if not ok:
        raise DataConfigError(
            "mix_weights",
            f"{list(weights)} are invalid: give {count} finite, non-negative numbers "
            "(--data.mix_weights, one per --data.train_shards folder), not all zero",
        )


class ShardStream(IterableDataset):
    """Decoded samples of a list of shards, split across ranks and workers; endless if ``repeat``.

    An epoch that yields no sample at all is an error (an endless stream of nothing would spin
    forever), and so is a label outside the vocabulary of ``num_classes`` classes (when given).
    """

    def __init__(
        self,
        shards: list[str],
        dataset_index: int,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        shuffle_buffer: int = 256,
        start_epoch: int = 0,
        num_classes: int | None = None,
    ) -> None:
        self.shards = shards
        self.dataset_index = dataset_index
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.shuffle_buffer = shuffle_buffer
        self.start_epoch = start_epoch
        self.num_classes = num_classes

    def __iter__(self) -> Iterator[dict]:
        rank, world = rank_and_world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.start_epoch
        while True:
            urls = shards_for_epoch(self.shards, epoch, self.seed, rank, world, worker, num_workers, self.shuffle)
            if not urls:  # more readers than shards: this one has nothing to read, ever
                return
            # One pipeline per epoch: the shuffle buffer drains at the epoch's end, so no sample
            # of the next epoch is drawn before every sample of this one has been.
            stages = [wds.SimpleShardList(urls), decoded_samples]
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}-{rank}-{worker}-{epoch}")  # webdataset wants random.Random
                stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))
            count = 0
            for sample in wds.DataPipeline(*stages):
                self._check_labels(sample)
                sample["dataset_index"] = self.dataset_index
                count += 1
                yield sample
            if count == 0:
                shown = ", ".join(urls[:3]) + (", ..." if len(urls) > 3 else "")
                raise ShardFormatError(
                    f"the shards {shown} hold no sample (every image skipped at extraction?): "
                    "re-extract them, or leave them out of the folder"
                )
            if not self.repeat:
                return
            epoch += 1

    def _check_labels(self, sample: dict) -> None:
        labels = sample["labels"]
        if self.num_classes is not None and len(labels) and int(labels.max()) >= self.num_classes:
            raise ShardFormatError(
                f"sample {sample['__key__']} of {sample.get('__url__', 'a shard')} "
                f"has class index {int(labels.max())}, "
                f"but the manifest's vocabulary has {self.num_classes} classes: the manifest does not belong to "
                "these shards; restore the one written by the extraction, or re-extract"
            )


@dataclass
class RegionBatch:
    """A padded batch. B images, N = most boxes in the batch, T CLIP tokens of dim D."""

    sam: Tensor  # [B, N, 256] float
    clip: Tensor  # [B, T, D] float16
    boxes: Tensor  # [B, N, 4] xyxy pixels
    labels: Tensor  # [B, N] int64, -1 for padding / unknown
    scores: Tensor  # [B, N] proposal scores
    valid: Tensor  # [B, N] bool, False for padding
    dataset_index: int
    meta: list[dict] = field(default_factory=list)

    TENSORS = ("sam", "clip", "boxes", "labels", "scores", "valid")

    def to(self, device: torch.device | str) -> RegionBatch:
        moved = {k: getattr(self, k).to(device, non_blocking=True) for k in self.TENSORS}
        return RegionBatch(**moved, dataset_index=self.dataset_index, meta=self.meta)

    @property
    def padding_mask(self) -> Tensor:
        return ~self.valid


def collate_regions(
    samples: list[dict], max_boxes: int | None = None, rng: np.random.Generator | None = None
) -> RegionBatch:
    """Pad per-image boxes to the batch maximum; keep a random subset when over ``max_boxes``."""
    if len({s["dataset_index"] for s in samples}) != 1:
        raise ValueError("a batch must come from one dataset (its vocabulary scores it)")
    picked = []  # per image: the kept box indices, or None for all of them (no fancy-index copy)
    for s in samples:
        n = len(s["labels"])
        if max_boxes is not None and n > max_boxes:
            picked.append(np.sort((rng or np.random.default_rng()).choice(n, max_boxes, replace=False)))
        else:
            picked.append(None)
    counts = [len(s["labels"]) if keep is None else len(keep) for s, keep in zip(samples, picked)]
    b, n = len(samples), max(1, *counts)
    t = batch_tensors(
        {
            "sam": ((b, n, samples[0]["sam"].shape[1]), torch.float32),
            "clip": ((b, *samples[0]["clip"].shape), torch.float16),
            "boxes": ((b, n, 4), torch.float32),
            "labels": ((b, n), torch.int64),
            "scores": ((b, n), torch.float32),
            "valid": ((b, n), torch.bool),
        }
    )
    # filled through NumPy views (cheaper per call than torch indexing)
    sam, clip, boxes, labels, scores, valid = (t[k].numpy() for k in RegionBatch.TENSORS)
    sam.fill(0)
    boxes.fill(0)
    labels.fill(-1)
    scores.fill(0)
    for i, (s, keep, k) in enumerate(zip(samples, picked, counts)):
        rows = slice(None) if keep is None else keep
        sam[i, :k] = s["sam"][rows]
        boxes[i, :k] = s["boxes"][rows]
        labels[i, :k] = s["labels"][rows]
        scores[i, :k] = s["scores"][rows]
    np.less(np.arange(n)[None, :], np.array(counts)[:, None], out=valid)
    np.stack([s["clip"] for s in samples], out=clip)
    meta = [
        {**s["meta"], "kept": None if keep is None else keep.tolist(), "key": s["__key__"]}
        for s, keep in zip(samples, picked)
    ]
    return RegionBatch(*(t[k] for k in RegionBatch.TENSORS), samples[0]["dataset_index"], meta)


def batch_tensors(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """Uninitialised tensors of the given shapes, carved out of one buffer (64-byte aligned).

    One storage per batch instead of six: a batch crosses from a loader worker to the main
    process as one shared-memory segment, which is what a transfer costs (docs/benchmarks.md).
    """
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in specs.items()}
    offsets, total = {}, 0
    for k, size in sizes.items():
        offsets[k] = total
        total += -(-size // 64) * 64
    buffer = torch.empty(total, dtype=torch.uint8)
    return {
        k: buffer[offsets[k] : offsets[k] + sizes[k]].view(dtype).view(shape) for k, (shape, dtype) in specs.items()
    }


class MixedBatches(IterableDataset):
    """Batches of each dataset, interleaved at random with fixed weights (seeded).

    Batches are mixed, not samples, so every batch is scored against one vocabulary.
    """

    def __init__(
        self, streams: list[ShardStream], weights: list[float], batch_size: int, max_boxes: int | None, seed: int
    ) -> None:
        check_mix_weights(weights, len(streams))
        total = float(sum(weights))
        self.streams, self.probs = streams, [w / total for w in weights]
        self.batch_size, self.max_boxes, self.seed = batch_size, max_boxes, seed

    def __iter__(self) -> Iterator[RegionBatch]:
        rank, _ = rank_and_world()
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, rank, info.id if info else 0, 1])
        iters = [iter(s) for s in self.streams]
        while True:
            d = int(rng.choice(len(iters), p=self.probs))
            samples = []
            for s in iters[d]:
                samples.append(s)
                if len(samples) == self.batch_size:
                    break
            if not samples:  # this worker has no shard of dataset d: a configuration error upstream
                return
            yield collate_regions(samples, self.max_boxes, rng)


class ValidationBatches(IterableDataset):
    """One pass over the validation shards (this rank's share), in batches, boxes never capped."""

    def __init__(self, stream: ShardStream, batch_size: int) -> None:
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[RegionBatch]:
        samples = []
        for s in self.stream:
            samples.append(s)
            if len(samples) == self.batch_size:
                yield collate_regions(samples)
                samples = []
        if samples:
            yield collate_regions(samples)


def _no_collate(batch):
    return batch


class RegionDataModule(L.LightningDataModule):
    """Feature-cache batches for ``fit``: mixed training datasets, one validation set."""

    def __init__(self, config: DataConfig, seed: int = 0) -> None:
        super().__init__()
        if not config.train_shards:
            raise ShardFormatError("no training shard folders given (--data.train_shards [DIR,...])")
        self.config, self.seed = config, seed
        self.train = [ShardFolder.read(f) for f in config.train_shards]
        self.val = ShardFolder.read(config.val_shards) if config.val_shards else None
        self.mix_weights = list(config.mix_weights) if config.mix_weights else [1.0] * len(self.train)
        check_mix_weights(self.mix_weights, len(self.train))
        self.start_epoch = 0
        self._check_same_backbones()
        self._check_trainable()

    def _check_trainable(self) -> None:
        """Every training folder must hold boxes with a class: proposals and whole-image prompts
        (label -1) teach nothing, and a run on them would "train" at loss 0."""
        for info in self.train:
            if info.counts is not None and info.counts.get("labelled_boxes") == 0:
                raise ShardFormatError(
                    f"{info.folder} holds no box with a class ({info.counts['samples']} images, "
                    f"{info.counts['boxes']} boxes, all unlabelled: proposals, or images without annotations): "
                    "nothing to train on; train on shards extracted from ground-truth annotations"
                )

    def _check_same_backbones(self) -> None:
        """Every folder from one frozen pair: the head learns one SAM's tokens against one
        vision-language model's map, so folders of two pairs (even of equal widths) never mix."""
        infos = self.train + ([self.val] if self.val else [])
        pairs = {(i.manifest.sam.type, i.clip.id) for i in infos}
        if len(pairs) != 1:
            named = "; ".join(f"{i.folder}: SAM {i.manifest.sam.type} + {i.clip.model} (id {i.clip.id})" for i in infos)
            raise ShardFormatError(
                f"shard folders were extracted with different frozen pairs ({named}); "
                "re-extract them with one SAM and one vision-language model"
            )

    def train_workers(self, world: int) -> int:
        """Loader workers per rank: ``workers``, capped at the shards the smallest training
        folder gives each rank (a worker without a shard would wait forever for data)."""
        per_rank = min(len(info.shards) // world for info in self.train)
        if per_rank == 0:
            smallest = min(self.train, key=lambda info: len(info.shards))
            raise ShardFormatError(
                f"{smallest.folder} has {len(smallest.shards)} shards, fewer than the {world} ranks: some ranks would "
                "get no data. Train on fewer devices or re-extract with a smaller --shard_size"
            )
        if self.config.workers > per_rank:
            log.warning(
                "--data.workers %d capped at %d: the smallest training folder has %d shards for each of %d ranks",
                self.config.workers,
                per_rank,
                per_rank,
                world,
            )
        return min(self.config.workers, per_rank)

    @property
    def clip_info(self) -> ClipBackbone:
        return self.train[0].clip

    def train_dataloader(self) -> DataLoader:
        workers = self.train_workers(rank_and_world()[1])
        cfg = self.config
        streams = [
            ShardStream(
                info.shards,
                i,
                self.seed,
                shuffle=True,
                repeat=True,
                shuffle_buffer=cfg.shuffle_buffer,
                start_epoch=self.start_epoch,
                num_classes=len(info.vocabulary),
            )
            for i, info in enumerate(self.train)
        ]
        mixed = MixedBatches(
            streams, self.mix_weights, cfg.batch_size, cfg.max_boxes_per_image, self.seed + self.start_epoch
        )
        # timeout: a worker stuck on a read (a stalled network mount or pipe) fails the run instead of hanging it
        return DataLoader(
            mixed,
            batch_size=None,
            num_workers=workers,
            collate_fn=_no_collate,
            persistent_workers=workers > 0,
            timeout=cfg.read_timeout if workers else 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        stream = ShardStream(self.val.shards, 0, shuffle=False, repeat=False, num_classes=len(self.val.vocabulary))
        workers = min(self.config.workers, math.ceil(len(self.val.shards) / rank_and_world()[1]))
        return DataLoader(
            ValidationBatches(stream, self.config.batch_size),
            batch_size=None,
            num_workers=workers,
            collate_fn=_no_collate,
            timeout=self.config.read_timeout if workers else 0,
        )

    def transfer_batch_to_device(self, batch: RegionBatch, device: torch.device, dataloader_idx: int) -> RegionBatch:
        return batch.to(device)
