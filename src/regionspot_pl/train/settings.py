"""The settings of a training run (``python -m regionspot_pl.fit``): the paper's recipe as defaults.

A light module (no Lightning, no CLIP): ``fit --help`` and the settings checks start without
them. Ranges are part of the types (:mod:`regionspot_pl.utils.checks`); the rules across
settings are :meth:`FitConfig.check`.
"""

import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..errors import RegionSpotError
from ..evaluation.metrics import BACKENDS, DEFAULT_BACKEND
from ..model.head import AUTO, VARIANTS
from ..utils.checks import Range, SettingError, check_settings

Variant = Literal[(AUTO, *VARIANTS)]
Precision = Literal["auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


class DataConfigError(SettingError):
    """A data setting is out of range (batch size, workers, weights, caps)."""


class FitError(RegionSpotError, ValueError):
    """A training run is misconfigured (settings that do not go together, shards, vocabulary, checkpoint)."""


@dataclass
class ModelConfig:
    """Which head to train."""

    variant: Variant = AUTO
    """auto: the published variant made for the shards' CLIP, else a head at its widths"""
    ffn_dim: Annotated[int, Range(1)] | None = None
    """feed-forward width of a head for an unpublished CLIP (default 2048)"""
    num_heads: Annotated[int, Range(1)] | None = None
    """attention heads of a head for an unpublished CLIP (default 8)"""

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class DataConfig:
    """What fit reads: the shard folders and how they are batched."""

    train_shards: list[str] = field(default_factory=list)
    """shard folders to train on (python -m regionspot_pl.extract --out), e.g. [DIR] or [DIR1,DIR2]"""
    mix_weights: list[Annotated[float, Range(0)]] | None = None
    """sampling weight of each train_shards folder (default: equal)"""
    val_shards: str | None = None
    """shard folder to validate on"""
    val_annotations: str | None = None
    """GT file of the validation shards (LVIS/COCO JSON)"""
    batch_size: Annotated[int, Range(1)] = 2
    """images per device per step (8 GPUs x 2 = the paper's 16)"""
    workers: Annotated[int, Range(0)] = 4
    """loader workers per device; capped at the shards each rank gets"""
    max_boxes_per_image: Annotated[int, Range(1)] | None = None
    """cap on box prompts per image (default: all, as the paper)"""
    shuffle_buffer: Annotated[int, Range(0)] = 256
    """samples in each reader's shuffle buffer"""
    read_timeout: Annotated[float, Range(1e-3)] = 600.0
    """seconds a loader worker may take for a batch before the run fails instead of waiting"""

    def __post_init__(self) -> None:
        check_settings(self, DataConfigError)


@dataclass
class OptimConfig:
    """The paper's optimizer and schedule. ``warmup_iters`` and ``milestones`` are given for a run
    of ``schedule_steps`` (the paper's 450K) and scale with the run's length, so a run of any
    ``max_steps`` follows the same curve, compressed or stretched (a run resumed with another
    ``max_steps`` follows that run's curve from the step it reached)."""

    lr: Annotated[float, Range(0)] = 2.5e-5
    """AdamW base learning rate (the paper's, for 16 images a step)"""
    weight_decay: Annotated[float, Range(0)] = 1e-4
    """AdamW weight decay"""
    warmup_iters: Annotated[int, Range(0)] = 1000
    """linear warm-up length, in steps of a run of schedule_steps"""
    warmup_factor: Annotated[float, Range(0)] = 0.01
    """learning-rate multiplier at step 0 of the warm-up"""
    milestones: list[Annotated[int, Range(0)]] = field(default_factory=lambda: [350_000, 420_000])
    """steps (of a run of schedule_steps) where the rate is multiplied by gamma"""
    gamma: Annotated[float, Range(0)] = 0.1
    """learning-rate multiplier at each milestone"""
    schedule_steps: Annotated[int, Range(1)] = 450_000
    """the run length warmup_iters and milestones are given for; they scale to max_steps"""
    clip_grad_norm: Annotated[float, Range(0)] = 1.0
    """clip gradients to this global L2 norm"""

    def __post_init__(self) -> None:
        check_settings(self)

    def for_run(self, max_steps: int) -> dict:
        """The settings of a run of ``max_steps``: warm-up and milestones scaled to it."""
        scale = max_steps / self.schedule_steps
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_iters": round(self.warmup_iters * scale),
            "warmup_factor": self.warmup_factor,
            "milestones": [round(m * scale) for m in self.milestones],
            "gamma": self.gamma,
        }


@dataclass
class TrainerConfig:
    """How long, where and how often (Lightning's Trainer)."""

    max_steps: Annotated[int, Range(1)] = 450_000
    """training steps (the paper: 450K)"""
    val_every: Annotated[int, Range(1)] = 50_000
    """validate (and keep the best head) every N steps, and at the end"""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """cpu, gpu or auto"""
    devices: int | str = "auto"
    """devices per node: a count, auto, or a list such as 0,1"""
    num_nodes: Annotated[int, Range(1)] = 1
    """nodes"""
    strategy: Literal["auto", "ddp"] = "auto"
    """auto: Lightning's choice (DDP over several devices); ddp: DDP on one device too (NCCL on a GPU)"""
    precision: Precision = "auto"
    """auto: bf16-mixed where the card has bf16, 16-mixed on others (V100), 32-true on CPU"""
    log_every_n_steps: Annotated[int, Range(1)] = 50
    """steps between rows of the CSV log"""
    enable_progress_bar: bool = True
    """Lightning's progress bar (false for log files)"""

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class FitConfig:
    """Everything a training run depends on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init_from: str | None = None
    """head checkpoint or head folder to start from (advanced: the warm-up head)"""
    out: str = "runs/fit"
    """run folder"""
    seed: int = 0
    """seed of the shard order, the box sampling and the initialisation"""
    resume: str | None = None
    """'last' (OUT/checkpoints/last.ckpt) or a .ckpt file to continue"""
    text_cache: str | None = None
    """HDF5 text-embedding cache (default: the one the shards name)"""
    metric_backend: Literal[BACKENDS] = DEFAULT_BACKEND
    """validation AP by hotcoco (fast) or lvis (the official LVIS API)"""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        check_settings(self)

    def check(self) -> None:
        """Rules across settings (each setting's own type and range are checked as it is set)."""
        if self.data.val_shards and not self.data.val_annotations:
            raise FitError("--data.val_shards needs --data.val_annotations (the GT file AP is computed against)")
