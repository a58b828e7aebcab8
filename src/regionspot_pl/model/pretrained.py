"""Heads as model folders, the layout Hugging Face models use, through ``huggingface_hub``'s
:class:`~huggingface_hub.ModelHubMixin`: :class:`HeadFolderMixin` gives the head
``save_pretrained``, ``from_pretrained`` and ``push_to_hub``.

A folder holds ``config.json`` (the head's sizes, its variant and what is known about how it was
made), ``model.safetensors`` (the weights, official parameter names) and ``README.md`` (the model
card, :mod:`.card`). Loading reads it back bit-identically from a local folder or a Hugging Face
Hub repository id, and never unpickles: JSON and safetensors only, with the config's keys and types
and every weight's name, shape and dtype checked before a tensor is read. Each file is written
atomically.

``load_head`` in :mod:`.checkpoint` accepts a folder wherever a ``.pt`` head is accepted, so every
``--head`` flag takes either.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils.io import AtomicFile, read_json
from .card import LIBRARY_NAME, TAGS, VARIANT_BACKBONES, model_card
from .errors import CheckpointError, CheckpointNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_TYPE = "regionspot_head"
FOLDER_FORMAT_VERSION = 1

# config.json keys besides the head sizes; the card's facts, each a dict or null.
_META_KEYS = ("model_type", "format_version", "variant", "backbones", "training", "metrics")
# sizes a folder written before they existed lacks: read as their default (every such head is a
# CLIP head, whose logit scale is 100)
_OPTIONAL_SIZES = ("logit_scale",)
_CARD_KEYS = ("backbones", "training", "metrics")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


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


class HeadFolderMixin(ModelHubMixin, library_name=LIBRARY_NAME, tags=list(TAGS)):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` of a head, in the folder format
    above. The model class sets ``config_class``, the dataclass of its sizes (its ``__init__``
    arguments, and its ``config`` attribute), and keeps its variant name in ``variant``."""

    config_class: ClassVar[type]
    variant: str

    def folder_config(
        self,
        variant: str | None = None,
        backbones: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """config.json of this head: sizes, variant (default: its own) and the card's facts. A fact
        left None keeps what the folder the head was loaded from (or last saved to) says; else
        ``backbones`` are the published variant's, if it is one."""
        variant = variant or self.variant
        known = self._hub_mixin_config if isinstance(self._hub_mixin_config, dict) else {}
        known = known if known.get("model_type") == MODEL_TYPE else {}
        facts = {"backbones": backbones, "training": training, "metrics": metrics}
        facts = {key: known.get(key) if value is None else value for key, value in facts.items()}
        if facts["backbones"] is None:
            facts["backbones"] = VARIANT_BACKBONES.get(variant)
        return {
            "model_type": MODEL_TYPE,
            "format_version": FOLDER_FORMAT_VERSION,
            "variant": variant,
            **self.config.to_dict(),
            **facts,
        }

    def save_pretrained(
        self, save_directory: str | Path, *, config: dict[str, Any] | None = None, **kwargs: Any
    ) -> str | None:
        """Write the folder (ModelHubMixin.save_pretrained). ``kwargs``: :meth:`folder_config`'s
        facts (``variant``, ``backbones``, ``training``, ``metrics``) and the mixin's own
        (``push_to_hub``, ``repo_id`` ...). ``config``: a whole config.json to write instead of
        :meth:`folder_config` of the facts. The files are replaced if present."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"{folder} is a file; a model folder is written to a directory path")
        facts = {key: kwargs.pop(key) for key in ("variant", *_CARD_KEYS) if key in kwargs}
        config = self.folder_config(**facts) if config is None else config
        check_config(config, folder / CONFIG_NAME, self.config_class)  # never write a folder we would refuse
        self._hub_mixin_config = config  # what _save_pretrained writes, and push_to_hub uploads
        return super().save_pretrained(folder, config=config, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The three files, each atomically (ModelHubMixin then finds config.json and README.md
        written and leaves them)."""
        config = self._hub_mixin_config
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with AtomicFile(save_directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), {"format": "pt"})
        with AtomicFile(save_directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        with AtomicFile(save_directory / CARD_NAME) as tmp:
            tmp.write_text(model_card(config, [f.name for f in fields(self.config_class)]))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The card (:func:`.card.model_card`) of :meth:`folder_config`."""
        return ModelCard(model_card(self.folder_config(), [f.name for f in fields(self.config_class)]))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        map_location: str | torch.device = "cpu",
        **hub_kwargs: Any,
    ) -> Any:
        """A head from a model folder or a Hugging Face Hub id, checked, in eval mode on ``map_location``.

        ``hub_kwargs``: ``hf_hub_download``'s ``revision``, ``cache_dir``, ``token``,
        ``force_download``, ``local_files_only``.

        Raises:
            CheckpointNotFoundError (a FileNotFoundError): no such folder (and not a hub id).
            CheckpointError: a file is missing or unreadable, the config has unknown, missing or
                mistyped keys, or the weights do not have the names, shapes and dtypes it asks for.
        """
        folder = resolve_folder(pretrained_model_name_or_path, **hub_kwargs)
        read_config(folder, cls.config_class)  # checked before ModelHubMixin passes it on
        return super().from_pretrained(folder, map_location=map_location)

    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, config: dict[str, Any], map_location: str | torch.device = "cpu", **model_kwargs: Any
    ) -> Any:
        """The head of a checked local folder; ``model_kwargs``: its sizes (ModelHubMixin reads
        them from config.json) and the unused download arguments."""
        sizes = {f.name: model_kwargs.get(f.name, f.default) for f in fields(cls.config_class)}
        head = cls(**sizes)
        folder = Path(model_id)
        weights = folder / WEIGHTS_NAME
        _check_weights(head, weights, folder / CONFIG_NAME)
        try:
            with safe_open(str(weights), framework="pt") as f:
                state = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights} could not be read as safetensors ({err})") from err
        head.load_state_dict(state, strict=True)
        head.variant = config["variant"]
        head.backbones = config.get("backbones")
        head._hub_mixin_config = config  # saved again (save_pretrained, push_to_hub) with its facts
        return head.to(map_location).eval()


def save_pretrained(head: HeadFolderMixin, folder: str | Path, **facts: Any) -> Path:
    """Write ``head`` as a model folder (``head.save_pretrained``); returns the folder.

    ``facts``: ``variant`` ('BB', 'BL', 'BL@336' or 'custom'; default: the head's), ``backbones``
    (the frozen models it needs, e.g. ``{"sam": "vit_b", "clip": ...}``; default: the published
    variant's), ``training`` (e.g. ``{"data": [...], "steps": 450000}``), ``metrics`` (e.g.
    ``{"val/AP": 0.21}``). The weights are written as they are (dtype kept, bit-identical).
    """
    head.save_pretrained(folder, **facts)
    return Path(folder)


# ------------------------------------------------------------------------------------- reading
def resolve_folder(ref: str | Path, **hub_kwargs: Any) -> Path:
    """A local model folder, or the local copy of a hub repository's config and weights."""
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
    return _download(str(ref), **hub_kwargs)


def _download(repo_id: str, **hub_kwargs: Any) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, **hub_kwargs)
        hf_hub_download(repo_id, WEIGHTS_NAME, **hub_kwargs)
    except Exception as err:  # offline, no such repository, no access, ...
        raise CheckpointNotFoundError(
            f"{repo_id!r} is no local file or folder, and the Hugging Face Hub did not provide "
            f"it ({type(err).__name__}: {err}); check the path or the repository id"
        ) from err
    return Path(config).parent


def read_config(folder: str | Path, sizes: type) -> dict[str, Any]:
    """A folder's config.json, checked (:func:`check_config`)."""
    path = Path(folder) / CONFIG_NAME
    config = read_json(path, "head config", CheckpointError)
    check_config(config, path, sizes)
    return config


def check_config(config: object, path: Path, sizes: type) -> None:
    """Keys, types and values of a head folder's config; CheckpointError naming ``path``.

    ``sizes``: the dataclass of the head sizes (HeadConfig); its fields' defaults give the types.
    """
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
    size_keys = [f.name for f in fields(sizes)]
    unknown = sorted(set(config) - set(size_keys) - set(_META_KEYS))
    missing = [k for k in size_keys if k not in config and k not in _OPTIONAL_SIZES]
    if unknown or missing:
        raise CheckpointError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    _check_sizes(config, path, sizes())
    if not isinstance(config.get("variant"), str) or not config["variant"]:
        raise CheckpointError(f"{path}: variant must be a non-empty string, got {config.get('variant')!r}")
    for key in _CARD_KEYS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{path}: {key} must be an object or null, got {config[key]!r}")


def _check_sizes(config: dict[str, Any], path: Path, defaults: Any) -> None:
    """Each size of the type of its default (ints >= 1), dropout in [0, 1), heads dividing the width,
    a positive finite logit scale."""
    for f in fields(defaults):
        value, kind = config.get(f.name, getattr(defaults, f.name)), type(getattr(defaults, f.name))
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and (kind is float or isinstance(value, int))
        )  # fmt: skip
        if not ok:
            raise CheckpointError(f"{path}: {f.name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
        if kind is int and value < 1:
            raise CheckpointError(f"{path}: {f.name} must be >= 1, got {value}")
    if not (0 <= config["dropout"] < 1 and math.isfinite(config["dropout"])):
        raise CheckpointError(f"{path}: dropout must be in [0, 1), got {config['dropout']}")
    scale = config.get("logit_scale", defaults.logit_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise CheckpointError(f"{path}: logit_scale must be a positive number, got {scale}")
    if config["clip_dim"] % config["num_heads"]:
        raise CheckpointError(
            f"{path}: clip_dim {config['clip_dim']} is not divisible by num_heads {config['num_heads']}"
        )


def _check_weights(head: torch.nn.Module, weights: Path, config: Path) -> None:
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
        if dtypes[key] not in _FLOAT_DTYPES:
            raise CheckpointError(f"{weights}: {key!r} has dtype {dtypes[key]}, expected floats")
