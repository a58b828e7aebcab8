"""Heads as model folders, the layout Hugging Face models use: load one by path or hub id.

A folder holds ``config.json`` (the head's sizes, its variant and what is known about how it was
made), ``model.safetensors`` (the weights, official parameter names) and ``README.md`` (a model
card). :func:`save_pretrained` writes it; :func:`load_pretrained` reads it back bit-identically
from a local folder or a Hugging Face Hub repository id. Loading never unpickles: JSON and
safetensors only, with the config's keys and types and every weight's shape checked first.

``load_head`` in :mod:`.checkpoint` accepts a folder wherever a ``.pt`` head is accepted, so every
``--head`` flag takes either.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils.io import read_json
from .checkpoint import CheckpointError, CheckpointNotFoundError, infer_variant
from .head import HeadConfig, RegionSpotHead

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_TYPE = "regionspot_head"
FOLDER_FORMAT_VERSION = 1

# config.json keys besides HeadConfig's fields; the card's facts, each a dict or null.
_META_KEYS = ("model_type", "format_version", "variant", "backbones", "training", "metrics")
_CARD_KEYS = ("backbones", "training", "metrics")
# the frozen models each published variant was trained with (RegionSpot paper, Table 1)
_VARIANT_BACKBONES = {
    "BB": {"sam": "vit_b", "clip": "openai/clip-vit-base-patch16", "clip_image_size": 224},
    "BL": {"sam": "vit_b", "clip": "openai/clip-vit-large-patch14", "clip_image_size": 224},
    "BL@336": {"sam": "vit_b", "clip": "openai/clip-vit-large-patch14-336", "clip_image_size": 336},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(ref: str | Path) -> bool:
    """True for an ``owner/name`` reference that is no local path (and no ``.pt`` file name).

    When a local folder ``owner`` exists, ``owner/name`` is taken as a mistyped local path."""
    text = str(ref)
    return (
        not Path(text).exists()
        and not Path(text).parent.is_dir()
        and bool(_HUB_ID.match(text))
        and ".." not in text
        and not text.endswith((".pt", ".pth", ".ckpt"))
    )


# ------------------------------------------------------------------------------------- writing
def save_pretrained(
    head: RegionSpotHead,
    folder: str | Path,
    variant: str | None = None,
    backbones: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``head`` as a model folder: config.json, model.safetensors and README.md.

    Args:
        head: the head; its weights are written as they are (dtype kept, bit-identical).
        folder: created if missing; the three files are replaced if present.
        variant: 'BB', 'BL', 'BL@336' or 'custom'; None infers it from the sizes.
        backbones: the frozen models the head needs, e.g. ``{"sam": "vit_b", "clip": ...}``;
            None uses the published variant's, if it is one.
        training: how it was trained, e.g. ``{"data": [...], "steps": 450000}``.
        metrics: evaluation results, e.g. ``{"val/AP": 0.21}``.

    Returns:
        the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a model folder is written to a directory path")
    folder.mkdir(parents=True, exist_ok=True)
    variant = variant or getattr(head, "variant", None) or infer_variant(head.config) or "custom"
    if backbones is None:
        backbones = _VARIANT_BACKBONES.get(variant)
    config = {
        "model_type": MODEL_TYPE,
        "format_version": FOLDER_FORMAT_VERSION,
        "variant": variant,
        **head.config.to_dict(),
        "backbones": backbones,
        "training": training,
        "metrics": metrics,
    }
    _check_config(config, folder / CONFIG_NAME)  # never write a folder we would refuse to read
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    _write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    _write_atomic(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomic(folder / CARD_NAME, lambda tmp: tmp.write_text(model_card(config)))
    return folder


def _write_atomic(path: Path, write) -> None:
    # a crash never leaves a half-written file under the final name
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


_CARD = """---
library_name: regionspot_pl
tags:
- regionspot
- open-vocabulary
- region-recognition
- segment-anything
- clip
---

# RegionSpot head ({variant})

The trained part of RegionSpot ("Recognize Any Regions", Yang et al., NeurIPS 2024): region tokens
of a frozen SAM cross-attend to the feature map of a frozen CLIP and are projected into CLIP's
text space, where any class name can be scored. The frozen SAM and CLIP are not in this folder;
use the ones below.

| | |
|---|---|
{table}

## Results

{results}
## Use

```python
from regionspot_pl import load_head
head = load_head("THIS_FOLDER")  # a local folder or a Hugging Face Hub id
```

```bash
python -m regionspot_pl.predict --head THIS_FOLDER --image IMG --boxes "x1,y1,x2,y2" \\
    --vocab "cat,dog" --sam-type SAM_TYPE --sam-checkpoint SAM.pth --clip-model CLIP_DIR --out OUT.png
```

Files: `config.json` (sizes and the facts above), `model.safetensors` (weights, the official
RegionSpot parameter names), this card.
"""


def model_card(config: dict[str, Any]) -> str:
    """README.md text for a folder's config: what the head is, what it needs, how it was made."""
    sizes = ", ".join(f"{f.name} {config[f.name]}" for f in fields(HeadConfig))
    backbones = config.get("backbones") or {}
    training = config.get("training") or {}
    metrics = config.get("metrics") or {}
    rows = [
        ("variant", config["variant"]),
        ("SAM (frozen)", backbones.get("sam", "not recorded")),
        ("CLIP (frozen)", backbones.get("clip", "not recorded")),
        ("CLIP input size", backbones.get("clip_image_size", "not recorded")),
        ("training data", ", ".join(map(str, training.get("data", []))) or "not recorded"),
        ("training steps", training.get("steps", "not recorded")),
        ("made from", training.get("source", "not recorded")),
        ("head sizes", sizes),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if metrics:
        scores = "\n".join(f"| {k} | {float(v):.4f} |" for k, v in sorted(metrics.items()))
        results = f"| metric | value |\n|---|---|\n{scores}\n"
    else:
        results = (
            "Not evaluated when this folder was written; measure it with "
            "`python -m regionspot_pl.test --head THIS_FOLDER ...`.\n"
        )
    return _CARD.format(variant=config["variant"], table=table, results=results)


# ------------------------------------------------------------------------------------- reading
def load_pretrained(ref: str | Path, map_location: str | torch.device = "cpu") -> RegionSpotHead:
    """Load a head from a model folder or a Hugging Face Hub id; eval mode.

    Raises:
        CheckpointNotFoundError (a FileNotFoundError): no such folder (and not a hub id).
        CheckpointError: a file is missing or unreadable, the config has unknown, missing or
            mistyped keys, or the weights do not have the shapes the config asks for.
    """
    folder = resolve_folder(ref)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    config = read_config(folder)
    head_config = HeadConfig(**{f.name: config[f.name] for f in fields(HeadConfig)})
    head = RegionSpotHead(**head_config.to_dict())
    _check_weights(head, weights_path, config_path)
    state = {}
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path} could not be read as safetensors ({err})") from err
    head.load_state_dict(state, strict=True)
    head.variant = config["variant"]
    return head.to(map_location).eval()


def resolve_folder(ref: str | Path) -> Path:
    """A local model folder, or the local copy of a hub repository's config, weights and card."""
    path = Path(ref)
    if path.is_dir():
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise CheckpointError(
                    f"{path} is not a head folder: {name} is missing (a head folder holds "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by save_pretrained, "
                    "`python -m regionspot_pl.convert SRC DIR` or fit)"
                )
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a head folder")
    if not is_hub_id(ref):
        raise CheckpointNotFoundError(
            f"head folder not found: {path} (give a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, "
            "a head .pt file, or a Hugging Face Hub id owner/name)"
        )
    return _download(str(ref))


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, CONFIG_NAME)
        hf_hub_download(repo_id, WEIGHTS_NAME)
    except Exception as err:  # offline, no such repository, no access, ...
        raise CheckpointNotFoundError(
            f"{repo_id!r} is no local file or folder, and the Hugging Face Hub did not provide "
            f"it ({type(err).__name__}: {err}); check the path or the repository id"
        ) from err
    return Path(config).parent


def read_config(folder: str | Path) -> dict[str, Any]:
    """A folder's config.json, checked (see :func:`load_pretrained`)."""
    path = Path(folder) / CONFIG_NAME
    config = read_json(path, "head config", CheckpointError)
    _check_config(config, path)
    return config


def _check_config(config: object, path: Path) -> None:
    """Keys, types and values of a head folder's config; CheckpointError naming ``path``."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{path}: model_type is {config.get('model_type')!r}, expected {MODEL_TYPE!r}; "
            "this folder is not a regionspot_pl head"
        )
    if config.get("format_version") != FOLDER_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(this version reads {FOLDER_FORMAT_VERSION})"
        )
    head_keys = [f.name for f in fields(HeadConfig)]
    unknown = sorted(set(config) - set(head_keys) - set(_META_KEYS))
    missing = [k for k in head_keys if k not in config]
    if unknown or missing:
        raise CheckpointError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    defaults = HeadConfig()
    for key in head_keys:
        value, kind = config[key], type(getattr(defaults, key))
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and (kind is float or isinstance(value, int))
        )  # fmt: skip
        if not ok:
            raise CheckpointError(f"{path}: {key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        if kind is int and value < 1:
            raise CheckpointError(f"{path}: {key} must be >= 1, got {value}")
    if not (0 <= config["dropout"] < 1 and math.isfinite(config["dropout"])):
        raise CheckpointError(f"{path}: dropout must be in [0, 1), got {config['dropout']}")
    if config["clip_dim"] % config["num_heads"]:
        raise CheckpointError(
            f"{path}: clip_dim {config['clip_dim']} is not divisible by num_heads {config['num_heads']}"
        )
    if not isinstance(config.get("variant"), str) or not config["variant"]:
        raise CheckpointError(f"{path}: variant must be a non-empty string, got {config.get('variant')!r}")
    for key in _CARD_KEYS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{path}: {key} must be an object or null, got {config[key]!r}")


def _check_weights(head: RegionSpotHead, weights: Path, config: Path) -> None:
    """Every tensor the config's head has, with its shape and a float dtype, nothing else."""
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} could not be read as safetensors ({err})") from err
    sizes = ", ".join(f"{k} {v}" for k, v in head.config.to_dict().items())
    disagree = f"{weights} does not fit {config} ({sizes})"
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{disagree}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}; "
            "the two files come from different heads"
        )
    for key, shape in expected.items():
        if found[key] != shape:
            raise CheckpointError(
                f"{disagree}: {key!r} is {list(found[key])}, the config needs {list(shape)}; "
                "the two files come from different heads"
            )
        if dtypes[key] not in ("F16", "BF16", "F32", "F64"):
            raise CheckpointError(f"{weights}: {key!r} has dtype {dtypes[key]}, expected floats")


# ------------------------------------------------------------------------------ card sources
def fit_card(manifests: list[dict[str, Any]], steps: int | None) -> dict[str, Any]:
    """``backbones`` and ``training`` for :func:`save_pretrained` from the training caches'
    manifests (``fit``)."""
    first = manifests[0].get("backbones", {}) if manifests else {}
    clip = first.get("clip", {})
    backbones = {
        "sam": first.get("sam", {}).get("type"),
        "clip": Path(clip["model"]).name if clip.get("model") else None,
        "clip_id": clip.get("id"),
        "clip_image_size": clip.get("image_size"),
    }
    data = [m.get("dataset") or "unnamed cache" for m in manifests]
    training = {"data": data, "steps": steps, "source": "python -m regionspot_pl.fit"}
    return {"backbones": {k: v for k, v in backbones.items() if v is not None}, "training": training}


def official_card(variant: str, source: str | Path) -> dict[str, Any]:
    """``backbones`` and ``training`` for a head converted from an official checkpoint."""
    backbones = _VARIANT_BACKBONES.get(variant)
    training = {
        "data": ["Objects365", "OpenImages", "V3Det"],
        "source": f"official RegionSpot checkpoint {Path(source).name} (python -m regionspot_pl.convert)",
    }
    return {"backbones": backbones, "training": training}


# the name Hugging Face libraries give the loader
from_pretrained = load_pretrained
