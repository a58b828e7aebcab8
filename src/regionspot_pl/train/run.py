"""A training run of the head on cached features: data, head sizes, vocabularies, the Trainer,
and the outputs (:func:`train`; the command line is :mod:`regionspot_pl.fit`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from ..backbones.build import LazyTextEncoder
from ..backbones.clip import text_embeddings
from ..backbones.common import resolved_precision
from ..cache.manifest import ClipBackbone, ShardFolder
from ..data.annotations import check_ground_truth
from ..model.card import fit_card
from ..model.checkpoint import load_head, save_head
from ..model.head import HeadConfig, head_config_for
from ..model.pretrained import save_pretrained
from ..utils.io import write_json_atomic
from .datamodule import RegionDataModule
from .graceful_stop import GracefulStop
from .module import RegionSpotModule
from .settings import FitConfig, FitError, ModelConfig

LIGHTNING_PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}

# --------------------------------------------------------------------------------------------
# Inputs: data, head sizes, vocabularies, the checkpoint to resume
# --------------------------------------------------------------------------------------------


def build_data(cfg: FitConfig) -> RegionDataModule:
    """The shards to train and validate on, checked against each other and the GT file."""
    dm = RegionDataModule(cfg.data, seed=cfg.seed)
    if dm.val is not None:
        check_ground_truth(
            cfg.data.val_annotations, dm.val.vocabulary, dm.val.image_ids(), dm.val.folder, same_vocabulary=True
        )
    return dm


def size_head(model: ModelConfig, clip: ClipBackbone) -> tuple[HeadConfig, str | None]:
    """(head sizes, variant) for the shards' CLIP: the variant asked for, which must fit, or
    (auto) the one made for that CLIP, else a head of the default sizes at its widths."""
    config, variant = head_config_for(
        model.variant, clip.vision_dim, clip.text_dim, clip.image_size, f"the shards' CLIP ({clip.model})"
    )
    sizes = {k: v for k, v in (("ffn_dim", model.ffn_dim), ("num_heads", model.num_heads)) if v is not None}
    if sizes and variant is not None:
        raise FitError(
            f"the {variant} head has the published sizes: --model.ffn_dim and --model.num_heads size only a head "
            "for another CLIP (or pass --model.variant auto)"
        )
    # logits at the temperature of the shards' vision-language model (100 for CLIP)
    return dataclasses.replace(config, logit_scale=clip.logit_scale, **sizes), variant


def vocabulary_embeddings(info: ShardFolder, clip: LazyTextEncoder, text_cache: str | None) -> torch.Tensor:
    """[C, text_dim] text embeddings of a shard folder's vocabulary (from the HDF5 cache)."""
    cache = text_cache or info.manifest.text_cache
    emb = text_embeddings(clip, list(info.vocabulary.names), cache, info.clip.id)
    if emb.shape != (len(info.vocabulary), info.clip.text_dim):
        raise FitError(
            f"text embeddings {tuple(emb.shape)} do not match the vocabulary of {info.folder} "
            f"({len(info.vocabulary)} classes, text dim {info.clip.text_dim}); delete {cache} to rebuild"
        )
    return emb


def build_module(cfg: FitConfig, dm: RegionDataModule, head: HeadConfig) -> RegionSpotModule:
    """The LightningModule: the head (from ``init_from`` when given), the schedule scaled to
    the run, and the text embeddings of every vocabulary."""
    clip = LazyTextEncoder(dm.clip_info.model)
    module = RegionSpotModule(
        head=head.to_dict(),
        optim=cfg.optim.for_run(cfg.trainer.max_steps),
        text_embeddings=[vocabulary_embeddings(info, clip, cfg.text_cache) for info in dm.train],
        val_text_embeddings=vocabulary_embeddings(dm.val, clip, cfg.text_cache) if dm.val else None,
        val_category_ids=list(dm.val.vocabulary.category_ids) if dm.val else [],
        val_annotations=cfg.data.val_annotations if dm.val else None,
        metric_backend=cfg.metric_backend,
    )
    if cfg.init_from and not cfg.resume:
        init = load_head(cfg.init_from)
        # the same sizes; the logit scale is the shards' (a temperature, not a weight)
        if dataclasses.replace(init.config, logit_scale=head.logit_scale) != module.head.config:
            raise FitError(
                f"--init_from {cfg.init_from} is a head of sizes {init.config.to_dict()}, but this run "
                f"trains {head.to_dict()}: start from a checkpoint of the same variant"
            )
        module.head.load_state_dict(init.state_dict())
    return module


def resume_checkpoint(cfg: FitConfig, head: HeadConfig, dm: RegionDataModule) -> Path | None:
    """The checkpoint ``--resume`` names, checked to hold a head of this run's sizes."""
    if not cfg.resume:
        return None
    path = Path(cfg.out) / "checkpoints" / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
    if not path.is_file():
        raise FitError(f"cannot resume: {path} does not exist (run without --resume to start afresh)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a checkpoint, or one carrying code objects
        raise FitError(f"cannot resume from {path}: not a readable Lightning checkpoint ({err})") from err
    saved_head = saved.get("hyper_parameters", {}).get("head") if isinstance(saved, dict) else None
    if saved_head != head.to_dict():
        raise FitError(
            f"{path} holds a head of sizes {saved_head}, this run trains {head.to_dict()}: "
            "resume with the same --model, or start a new --out"
        )
    dm.start_epoch = int(saved.get("global_step", 0))  # a fresh shard order, not a replay of the start
    return path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': the device's precision (``backbones.common.resolved_precision``: bf16 on cards that
    have it, fp16 on others, fp32 on CPU) as Lightning's mixed precision (fp16 with loss scaling)."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return LIGHTNING_PRECISION[resolved_precision(torch.device("cuda" if on_gpu else "cpu"), "auto")]


def build_trainer(
    cfg: FitConfig, validating: bool, callbacks: list[L.Callback]
) -> tuple[L.Trainer, ModelCheckpoint, GracefulStop]:
    """Lightning's Trainer with the checkpointing and stop handling of a run."""
    t, out = cfg.trainer, Path(cfg.out)
    val_every = min(t.val_every, t.max_steps)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor="val/AP" if validating else None,
        mode="max",
        save_top_k=1 if validating else 0,
        save_last=True,
        every_n_train_steps=None if validating else val_every,
        enable_version_counter=False,  # last.ckpt is also written by GracefulStop: one file, never last-v1
    )
    # SIGTERM/SIGINT: stop at a step boundary with last.ckpt saved; and last.ckpt before every validation
    stop = GracefulStop(out / "checkpoints" / "last.ckpt", every=val_every if validating else None)
    trainer = L.Trainer(
        default_root_dir=out,
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        gradient_clip_val=cfg.optim.clip_grad_norm,
        gradient_clip_algorithm="norm",
        val_check_interval=val_every if validating else None,
        check_val_every_n_epoch=None,
        # a few validation batches at step 0, evaluated: a broken validation setup fails in the first minute
        limit_val_batches=None if validating else 0,
        num_sanity_val_steps=2 if validating else 0,
        callbacks=[checkpoint, LearningRateMonitor("step"), stop, *callbacks],
        # a new logs/version_N per start, so a resumed run never overwrites the log it resumes
        logger=CSVLogger(out, name="logs"),
        use_distributed_sampler=False,
        enable_model_summary=False,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
    )
    return trainer, checkpoint, stop


def write_outputs(
    cfg: FitConfig, trainer: L.Trainer, checkpoint: ModelCheckpoint, module: RegionSpotModule,
    dm: RegionDataModule, variant: str | None,
) -> dict:  # fmt: skip
    """head.pt, the head folder and fit_summary.json from the best (else last) checkpoint."""
    out = Path(cfg.out)
    result = {"best": checkpoint.best_model_path or None, "metrics": {}, "variant": variant or "custom"}
    if not trainer.is_global_zero:
        return result
    best = checkpoint.best_model_path or checkpoint.last_model_path
    final = RegionSpotModule.load_from_checkpoint(best, map_location="cpu", weights_only=True) if best else module
    result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    card = fit_card([info.manifest.to_dict() for info in dm.train], cfg.trainer.max_steps)
    final.head.backbones = card["backbones"]  # both files record the pair the head was trained on
    result["head"] = str(save_head(final.head, out / "head.pt", variant=variant))
    folder = save_pretrained(final.head, out / "head", variant=variant, metrics=result["metrics"] or None, **card)
    result["head_folder"] = str(folder)
    write_json_atomic(out / "fit_summary.json", result)
    return result


@contextmanager
def readers_fail_cleanly(read_timeout: float) -> Iterator[None]:
    """A stalled read (no batch within ``read_timeout``) or a dead loader worker, which PyTorch
    reports as a RuntimeError starting "DataLoader", becomes a FitError that says what to do."""
    try:
        yield
    except RuntimeError as err:
        if not str(err).startswith("DataLoader"):
            raise
        raise FitError(
            f"the shard readers failed: {err}. Either a read stalled (no batch within --data.read_timeout "
            f"{read_timeout:g} s: a slow mount or pipe) or a reader was killed (out of memory?); "
            "continue from the last saved step with --resume last"
        ) from err


def train(cfg: FitConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train as configured; returns {'head': path, 'best': ckpt or None, 'metrics': last val metrics,
    'variant': the head's}. ``callbacks`` join the Trainer's (e.g. to inspect batches in tests)."""
    cfg.check()
    L.seed_everything(cfg.seed, workers=True)
    dm = build_data(cfg)
    head, variant = size_head(cfg.model, dm.clip_info)
    module = build_module(cfg, dm, head)
    ckpt_path = resume_checkpoint(cfg, head, dm)
    trainer, checkpoint, stop = build_trainer(cfg, dm.val is not None, list(callbacks))
    with stop.guard(), readers_fail_cleanly(cfg.data.read_timeout):  # a stop: Stopped, with last.ckpt saved
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # resume never unpickles code
    # ModelCheckpoint saves on its interval only: make last.ckpt the final step, so that
    # `--resume last` with a larger --trainer.max_steps continues exactly where this run stopped.
    trainer.save_checkpoint(Path(cfg.out) / "checkpoints" / "last.ckpt", weights_only=False)
    return write_outputs(cfg, trainer, checkpoint, module, dm, variant)
