"""Train the RegionSpot head on cached features.

    python -m regionspot_pl.fit --stage warmup     # configs/fit/warmup.yaml: Objects365
    python -m regionspot_pl.fit --stage advanced   # configs/fit/advanced.yaml: O365+OI+V3Det, from warm-up

Flags override the stage's YAML. Writes OUT/checkpoints/{best,last}.ckpt, Lightning's CSV log
OUT/logs/version_N/metrics.csv, and OUT/head.pt (best by val AP if validating, else last), which
``regionspot_pl.load_head`` and ``python -m regionspot_pl.test --head`` read, and the same head as
a model folder OUT/head/ (config.json, model.safetensors, README.md model card), which they read too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from .backbones.clip import LazyTextEncoder, text_embeddings
from .config import find_config, load_yaml, merge
from .data.annotations import AnnotationError, check_ground_truth
from .data.datamodule import CacheInfo, DataConfigError, RegionDataModule
from .data.shards import ShardFormatError
from .evaluation.metrics import BACKENDS, DEFAULT_BACKEND
from .model.checkpoint import CheckpointError, load_head, save_head
from .model.head import VARIANTS, HeadConfig
from .model.pretrained import fit_card, save_pretrained
from .module import RegionSpotModule
from .stopping import GracefulStop, Stopped


class FitError(ValueError):
    """A training run is misconfigured (shards, vocabulary, checkpoint)."""


def head_config(model: dict, clip: dict) -> HeadConfig:
    """Head sizes from the model config, checked against the backbones the shards came from."""
    model = dict(model)
    variant = model.pop("variant", "auto")
    dims = {"clip_dim": clip["vision_dim"], "text_dim": clip["text_dim"]}
    if variant == "auto":
        return HeadConfig(**{**dims, **model})
    if variant not in VARIANTS:
        raise FitError(f"unknown model variant {variant!r}; expected one of {sorted(VARIANTS)} or 'auto'")
    config = HeadConfig(**{**VARIANTS[variant].to_dict(), **model})
    if (config.clip_dim, config.text_dim) != (dims["clip_dim"], dims["text_dim"]):
        raise FitError(
            f"the {variant} head expects CLIP features of width {config.clip_dim} and text dim {config.text_dim}, "
            f"but the shards were extracted with {clip['model']} "
            f"(width {dims['clip_dim']}, text dim {dims['text_dim']}). "
            "Pick the matching variant (BB for ViT-B/16, BL for ViT-L/14) or re-extract the shards."
        )
    return config


def vocabulary_embeddings(info: CacheInfo, clip: LazyTextEncoder, text_cache: str | None) -> torch.Tensor:
    """[C, text_dim] text embeddings of a shard folder's vocabulary (from the HDF5 cache)."""
    backbone = info.manifest["backbones"]["clip"]
    cache = text_cache or info.manifest["text_cache"]
    emb = text_embeddings(clip, list(info.vocabulary.names), cache, backbone["id"])
    if emb.shape != (len(info.vocabulary), backbone["text_dim"]):
        raise FitError(
            f"text embeddings {tuple(emb.shape)} do not match the vocabulary of {info.folder} "
            f"({len(info.vocabulary)} classes, text dim {backbone['text_dim']}); delete {cache} to rebuild"
        )
    return emb


def check_val_annotations(info: CacheInfo, annotations: str) -> None:
    """The GT file must describe the validation shards: their categories and every image they hold."""
    try:
        check_ground_truth(annotations, info.vocabulary.category_ids, info.image_ids(), info.folder)
    except AnnotationError as err:
        raise FitError(str(err)) from err


def check_numbers(cfg: dict) -> None:
    """Step counts and rates, before anything starts (the data's numbers are RegionDataModule's)."""
    trainer, optim = cfg.get("trainer", {}), cfg.get("optim", {})
    for key, flag in (("max_steps", "--max-steps"), ("val_check_interval", "--val-every")):
        value = trainer.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise FitError(f"{flag} {value!r} is invalid: it must be an integer >= 1")
    lr = optim.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 <= lr < float("inf")):
        raise FitError(f"--lr {lr!r} is invalid: it must be a finite number >= 0")


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': bf16 on cards that have it, fp16 with loss scaling on others (V100), fp32 on CPU."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regionspot_pl.fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stage", choices=("warmup", "advanced"), help="picks configs/fit/STAGE.yaml")
    p.add_argument("--config", help="a fit YAML (instead of the stage's)")
    p.add_argument("--model", help="model config name under configs/model (bb, bl, bl336, auto)")
    p.add_argument("--train-shards", nargs="+", help="shard folders to train on")
    p.add_argument("--mix-weights", nargs="+", type=float, help="sampling weight of each --train-shards folder")
    p.add_argument("--val-shards", help="shard folder to validate on")
    p.add_argument("--val-annotations", help="GT file of the validation shards (LVIS/COCO JSON)")
    p.add_argument("--init-from", help="head checkpoint or head folder to start from (advanced: the warm-up head.pt)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--val-every", type=int, help="validate every N training steps")
    p.add_argument("--batch-size", type=int, help="images per device per step")
    p.add_argument("--workers", type=int, help="loader workers per device")
    p.add_argument("--lr", type=float)
    p.add_argument("--out", help="run folder")
    p.add_argument("--accelerator", help="cpu, gpu or auto")
    p.add_argument("--devices", help="devices per node (int or auto)")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--precision", help="auto, 32-true, 16-mixed, bf16-mixed")
    p.add_argument("--resume", help="'last' (OUT/checkpoints/last.ckpt) or a .ckpt file")
    p.add_argument("--seed", type=int)
    p.add_argument("--text-cache", help="HDF5 text-embedding cache (default: the one the shards name)")
    p.add_argument(
        "--metric-backend",
        choices=BACKENDS,
        help="validation AP by hotcoco (default, fast) or lvis (the official LVIS API, the reference)",
    )
    return p


def build_config(args: argparse.Namespace) -> dict:
    if args.config:
        cfg = load_yaml(args.config)
    elif args.stage:
        cfg = load_yaml(find_config("fit", args.stage))
    else:
        raise SystemExit("error: pass --stage warmup|advanced or --config FILE")
    cfg.setdefault("model", "bl")
    model = args.model or cfg["model"]
    if isinstance(model, str):
        model = load_yaml(find_config("model", model))
    devices = args.devices
    if devices is not None and devices.isdigit():
        devices = int(devices)  # a count; "auto", "-1" and lists like "0,1" go to Lightning as given
    return merge(
        cfg,
        {
            "model": model,
            "init_from": args.init_from,
            "out": args.out,
            "seed": args.seed,
            "resume": args.resume,
            "text_cache": args.text_cache,
            "metric_backend": args.metric_backend,
            "data": {
                "train_shards": args.train_shards,
                "mix_weights": args.mix_weights,
                "val_shards": args.val_shards,
                "val_annotations": args.val_annotations,
                "batch_size": args.batch_size,
                "workers": args.workers,
            },
            "optim": {"lr": args.lr},
            "trainer": {
                "max_steps": args.max_steps,
                "val_check_interval": args.val_every,
                "accelerator": args.accelerator,
                "devices": devices,
                "num_nodes": args.num_nodes,
                "precision": args.precision,
            },
        },
    )


def run(cfg: dict, callbacks: list[L.Callback] = ()) -> dict:
    """Train as configured; returns {'head': path, 'best': ckpt or None, 'metrics': last val metrics}.

    ``callbacks`` are added to the Trainer's (e.g. to inspect batches in tests or notebooks).
    """
    out = Path(cfg.get("out", "runs/fit"))
    data, optim, trainer_cfg = cfg["data"], cfg.get("optim", {}), dict(cfg.get("trainer", {}))
    seed = int(cfg.get("seed", 0))
    check_numbers(cfg)
    metric_backend = cfg.get("metric_backend") or DEFAULT_BACKEND
    if metric_backend not in BACKENDS:
        raise FitError(
            f"unknown metric backend {metric_backend!r}: use 'hotcoco' (fast, the default) or 'lvis' "
            "(the official LVIS API, the reference)"
        )
    L.seed_everything(seed, workers=True)

    val_annotations = data.get("val_annotations")
    dm = RegionDataModule(
        train_shards=data.get("train_shards") or [],
        val_shards=data.get("val_shards"),
        batch_size=data.get("batch_size", 2),
        workers=data.get("workers", 2),
        max_boxes_per_image=data.get("max_boxes_per_image"),
        mix_weights=data.get("mix_weights"),
        shuffle_buffer=data.get("shuffle_buffer", 256),
        seed=seed,
    )
    if dm.val is not None and not val_annotations:
        raise FitError("--val-shards needs --val-annotations (the GT file AP is computed against)")
    if dm.val is not None:
        check_val_annotations(dm.val, val_annotations)
    head_cfg = head_config(cfg["model"], dm.clip_info)
    clip = LazyTextEncoder(dm.clip_info["model"])
    texts = [vocabulary_embeddings(info, clip, cfg.get("text_cache")) for info in dm.train]
    module = RegionSpotModule(
        head=head_cfg.to_dict(),
        **{k: v for k, v in optim.items() if k != "clip_grad_norm"},
        text_embeddings=texts,
        val_text_embeddings=vocabulary_embeddings(dm.val, clip, cfg.get("text_cache")) if dm.val else None,
        val_category_ids=list(dm.val.vocabulary.category_ids) if dm.val else [],
        val_annotations=val_annotations if dm.val else None,
        metric_backend=metric_backend,
    )
    if cfg.get("init_from") and not cfg.get("resume"):
        init = load_head(cfg["init_from"])
        if init.config != module.head.config:
            raise FitError(
                f"--init-from {cfg['init_from']} is a head of sizes {init.config.to_dict()}, but this run "
                f"trains {head_cfg.to_dict()}: start from a checkpoint of the same variant"
            )
        module.head.load_state_dict(init.state_dict())

    ckpt_path = None
    if cfg.get("resume"):
        ckpt_path = out / "checkpoints" / "last.ckpt" if cfg["resume"] == "last" else Path(cfg["resume"])
        if not ckpt_path.is_file():
            raise FitError(f"cannot resume: {ckpt_path} does not exist (run without --resume to start afresh)")
        try:
            saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated file, not a checkpoint, or one carrying code objects
            raise FitError(f"cannot resume from {ckpt_path}: not a readable Lightning checkpoint ({err})") from err
        saved_head = saved.get("hyper_parameters", {}).get("head")
        if saved_head != head_cfg.to_dict():
            raise FitError(
                f"{ckpt_path} holds a head of sizes {saved_head}, this run trains {head_cfg.to_dict()}: "
                "resume with the same --model, or start a new --out"
            )
        dm.start_epoch = int(saved.get("global_step", 0))  # a fresh shard order, not a replay of the start

    validating = dm.val is not None
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor="val/AP" if validating else None,
        mode="max",
        save_top_k=1 if validating else 0,
        save_last=True,
        every_n_train_steps=None if validating else trainer_cfg.get("val_check_interval") or 1000,
        enable_version_counter=False,  # last.ckpt is also written by GracefulStop: one file, never last-v1
    )
    accelerator = trainer_cfg.pop("accelerator", "auto") or "auto"
    val_every = trainer_cfg.pop("val_check_interval", None) or 1000
    max_steps = trainer_cfg.pop("max_steps", 450_000)
    # SIGTERM/SIGINT: stop at a step boundary with last.ckpt saved; and last.ckpt before every validation
    stop = GracefulStop(out / "checkpoints" / "last.ckpt", every=min(val_every, max_steps) if validating else None)
    trainer = L.Trainer(
        default_root_dir=out,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=trainer_cfg.pop("devices", "auto") or "auto",
        num_nodes=trainer_cfg.pop("num_nodes", 1) or 1,
        precision=resolve_precision(str(trainer_cfg.pop("precision", "auto")), accelerator),
        gradient_clip_val=optim.get("clip_grad_norm", 1.0),
        gradient_clip_algorithm="norm",
        val_check_interval=min(val_every, max_steps) if validating else None,
        check_val_every_n_epoch=None,
        # a few validation batches at step 0, evaluated: a broken validation setup fails in the first minute
        limit_val_batches=None if validating else 0,
        num_sanity_val_steps=2 if validating else 0,
        callbacks=[checkpoint, LearningRateMonitor("step"), stop, *callbacks],
        # a new logs/version_N per start, so a resumed run never overwrites the log it resumes
        logger=CSVLogger(out, name="logs"),
        use_distributed_sampler=False,
        enable_model_summary=False,
        **trainer_cfg,
    )
    with stop.guard():  # a stop signal ends here as Stopped, with last.ckpt saved
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # resume never unpickles code
    # ModelCheckpoint saves on its interval only: make last.ckpt the final step, so that
    # `--resume last` with a larger --max-steps continues exactly where this run stopped.
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)  # with optimizer state

    result = {"best": checkpoint.best_model_path or None, "metrics": {}}
    if trainer.is_global_zero:
        best = checkpoint.best_model_path or checkpoint.last_model_path
        final = RegionSpotModule.load_from_checkpoint(best, map_location="cpu", weights_only=True) if best else module
        variant = cfg["model"].get("variant", "auto")
        result["head"] = str(save_head(final.head, out / "head.pt", variant=None if variant == "auto" else variant))
        result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        result["head_folder"] = str(
            save_pretrained(
                final.head,
                out / "head",
                variant=None if variant == "auto" else variant,
                metrics=result["metrics"] or None,
                **fit_card([i.manifest for i in dm.train], max_steps),
            )
        )
        (out / "fit_summary.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = build_config(args)
    try:
        result = run(cfg)
    except Stopped as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    except (FitError, ShardFormatError, DataConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "head" in result:
        print(f"head written to {result['head']}")
        if result["metrics"]:
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(result["metrics"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
