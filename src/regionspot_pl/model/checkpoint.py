"""Head checkpoint files: our own ``.pt`` format, and import of the official RegionSpot checkpoints.

Our file format is a plain dict (loadable with ``torch.load(..., weights_only=True)``):
``{"format": "regionspot_pl.head", "version": 1, "variant": str, "config": HeadConfig dict,
"state_dict": {official head key: tensor}}``, and ``"backbones"`` (the frozen pair it was trained
on: str values) when known. A head can also be a model folder
(config.json + model.safetensors + README.md, :mod:`.pretrained`); :func:`load_head` reads both.
This module sits above the folder format: it imports :mod:`.pretrained`, never the reverse.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..utils.io import AtomicFile
from .card import official_card
from .errors import CheckpointError, CheckpointNotFoundError
from .head import HeadConfig, RegionSpotHead, infer_variant
from .pretrained import is_hub_id, save_pretrained

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "config_from_state_dict",
    "convert_official",
    "infer_variant",
    "load_head",
    "load_pretrained",
    "save_head",
]

HEAD_FORMAT = "regionspot_pl.head"
HEAD_FORMAT_VERSION = 1
HEAD_PREFIXES = ("to_clip.", "decoder.", "projector.")


def _torch_load(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle with code objects, not a torch file ...
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True ({err}). "
            "Expected a RegionSpot checkpoint: a dict of tensors saved with torch.save."
        ) from err


def save_head(head: RegionSpotHead, path: str | Path, variant: str | None = None) -> Path:
    """Write a head checkpoint that :func:`load_head` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": HEAD_FORMAT,
        "version": HEAD_FORMAT_VERSION,
        "variant": variant or head.variant,
        "config": head.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
    }
    if head.backbones:
        payload["backbones"] = dict(head.backbones)
    with AtomicFile(path) as tmp:  # a crash never leaves a half-written head behind
        torch.save(payload, tmp)
    return path


def load_head(path: str | Path, map_location: str | torch.device = "cpu") -> RegionSpotHead:
    """Load a head; eval mode. ``path`` is a head file (:func:`save_head`, fit's ``head.pt``,
    ``convert`` to a ``.pt``), a model folder (``save_pretrained``, fit's ``head/``, ``convert``
    to a folder) or a Hugging Face Hub id of such a folder."""
    if Path(path).is_dir() or is_hub_id(path):
        return load_pretrained(path, map_location)
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        hint = ""
        if isinstance(payload, dict) and "model" in payload:
            hint = (
                " It looks like an official RegionSpot checkpoint: "
                f"run `python -m regionspot_pl.convert {path} HEAD.pt` first."
            )
        raise CheckpointError(
            f"{path} is not a regionspot_pl head checkpoint (expected a dict with format={HEAD_FORMAT!r}).{hint}"
        )
    if payload.get("version") != HEAD_FORMAT_VERSION:
        raise CheckpointError(f"{path}: head format version {payload.get('version')} is not supported")
    config = HeadConfig(**payload["config"])
    if not (config.logit_scale > 0 and math.isfinite(config.logit_scale)):
        raise CheckpointError(f"{path}: logit_scale must be a positive number, got {config.logit_scale}")
    head = RegionSpotHead(**config.to_dict())
    head.load_state_dict(payload["state_dict"], strict=True)
    head.variant = payload.get("variant", "custom")
    head.backbones = _recorded_backbones(payload.get("backbones"), path)
    return head.to(map_location).eval()


def _recorded_backbones(value: object, path: str | Path) -> dict | None:
    """A head file's ``backbones``: None, or a dict of str -> str/int (checked: read from disk)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise CheckpointError(f"{path}: 'backbones' must map names to strings or integers, got {value!r:.200}")
    return value


def load_pretrained(ref: str | Path, map_location: str | torch.device = "cpu") -> RegionSpotHead:
    """A head from a model folder or a Hugging Face Hub id, in eval mode
    (``RegionSpotHead.from_pretrained``; its errors)."""
    return RegionSpotHead.from_pretrained(ref, map_location=map_location)


def config_from_state_dict(state: dict[str, Tensor]) -> HeadConfig:
    """Read the head sizes off the tensor shapes of an official-layout head state dict."""
    try:
        clip_dim, sam_dim = state["to_clip.weight"].shape
        text_dim = state["projector.weight"].shape[0]
        ffn_dim = state["decoder.layers.0.linear1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"head weights incomplete: missing {err.args[0]!r}") from err
    depth = len({k.split(".")[2] for k in state if k.startswith("decoder.layers.")})
    # The number of attention heads is not stored in the weights; every published head uses 8.
    return HeadConfig(sam_dim=sam_dim, clip_dim=clip_dim, text_dim=text_dim, depth=depth, ffn_dim=ffn_dim)


def _vision_tokens(state: dict[str, Tensor]) -> int | None:
    """Number of CLIP vision tokens from the frozen CLIP weights stored beside the head, if any."""
    for key, value in state.items():
        if key.startswith("clip_model.") and "visual" in key and key.endswith("positional_embedding"):
            return int(value.shape[0])
    return None


def convert_official(src: str | Path, dst: str | Path) -> tuple[str, Path]:
    """Extract the head of an official RegionSpot checkpoint into our format.

    The official file is ``{"model": {"model.to_clip.weight": ..., "model.sam.*": ...,
    "model.clip_model.*": ..., ...}}``; only ``to_clip``/``decoder``/``projector`` are kept.
    ``dst`` ending in ``.pt`` or ``.pth`` gets a head file (:func:`save_head`); any other ``dst``
    a model folder with config.json, model.safetensors and a model card (``save_pretrained``).

    Returns:
        (variant name, destination path).
    """
    payload = _torch_load(src)
    expected = (
        "Expected an official RegionSpot checkpoint: a dict with key 'model' whose keys start with "
        "'model.' and include 'model.to_clip.weight', 'model.decoder.layers.0...' and 'model.projector.weight'."
    )
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        found = sorted(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{src}: no 'model' dict (found {found}). {expected}")
    model = {k.removeprefix("model."): v for k, v in payload["model"].items()}
    head_state = {k: v for k, v in model.items() if k.startswith(HEAD_PREFIXES)}
    if "to_clip.weight" not in head_state:
        raise CheckpointError(f"{src}: no RegionSpot head weights found. {expected}")
    config = config_from_state_dict(head_state)
    variant = infer_variant(config) or "custom"
    if variant == "BL" and _vision_tokens(model) == 577:
        variant = "BL@336"
    head = RegionSpotHead(**config.to_dict())
    missing, unexpected = head.load_state_dict(head_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: head weights do not match a RegionSpot head of sizes {config}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if Path(dst).suffix in (".pt", ".pth"):
        return variant, save_head(head, dst, variant=variant)
    return variant, save_pretrained(head, dst, variant=variant, **official_card(variant, src))
