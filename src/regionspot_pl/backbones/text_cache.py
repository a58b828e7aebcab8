"""The HDF5 cache of text embeddings, and the identity of the model folder that keys it.

Text embeddings depend only on (model, vocabulary, templates), so they are computed once per
model and vocabulary and kept: extraction writes them, fit, test and the predictor read them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from ..utils.io import AtomicFile, FolderLock
from .common import BackboneNotFoundError
from .interfaces import VisionLanguageModel
from .templates import TEMPLATES
from .vlm import clean_class_name, read_model_type

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Names the way prompts are made (name handling + templates); part of every text-cache key.
PROMPT_PROTOCOL = "reference-prompts-v2"


def model_identity(model_dir: str | Path) -> str:
    """Short stable id of a model snapshot: sha256 over its weight files, 16 hex characters.

    For a family other than CLIP (config.json's ``model_type`` not 'clip') the model_type is
    hashed in too, so that two families never share an id (and a text-cache entry) even over the
    same weight bytes: MetaCLIP 2 has CLIP's parameter names but another tokenizer. A CLIP folder
    keeps the id of its weights alone, the id its shard folders and caches were made under.
    """
    path = Path(model_dir)
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)})
    if not files:
        raise BackboneNotFoundError(
            f"no weight files ({', '.join(_WEIGHT_PATTERNS)}) in {str(path)!r}; "
            "is it a Hugging Face model snapshot saved with save_pretrained?"
        )
    digest = hashlib.sha256()
    model_type = read_model_type(path)
    if model_type not in (None, "clip"):
        digest.update(b"model_type\0" + str(model_type).encode() + b"\0")
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _vocabulary_key(class_names: Sequence[str], templates: Sequence[str]) -> str:
    # PROMPT_PROTOCOL is hashed in so that entries written under another name handling or
    # template set can never be read back as this one's.
    text = json.dumps([PROMPT_PROTOCOL, [clean_class_name(c) for c in class_names], list(templates)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cached(cache_file: Path, key: str) -> np.ndarray | None:
    if not cache_file.is_file():
        return None
    with h5py.File(cache_file, "r") as f:
        return f[key]["embeddings"][()] if key in f else None


def text_embeddings(
    encoder: VisionLanguageModel,
    class_names: Sequence[str],
    cache_file: str | Path,
    model_id: str,
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """Template-averaged text embeddings [C, text_dim] float32 (CPU), through an HDF5 cache.

    ``encoder.encode_texts`` runs on a cache miss only (a ``build.LazyTextEncoder`` loads the
    model then).
    The cache holds one group per ``{model_id}/{hash of cleaned names + templates}`` with the
    embeddings, the class names and the templates. A new entry is written into a copy of the
    file that then atomically replaces it (under a lock file), so readers never see a partly
    written file and a killed writer leaves the old cache intact.
    """
    cache_file = Path(cache_file)
    key = f"{model_id}/{_vocabulary_key(class_names, templates)}"
    cached = _read_cached(cache_file, key)
    if cached is not None:
        return torch.from_numpy(cached).float()

    embeddings = encoder.encode_texts(class_names, templates).float().cpu()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(cache_file.with_name(cache_file.name + ".lock"), f"text cache {cache_file}", wait=True):
        if _read_cached(cache_file, key) is not None:  # another process wrote it meanwhile
            return embeddings
        with AtomicFile(cache_file) as tmp, h5py.File(tmp, "w") as out:
            if cache_file.is_file():
                with h5py.File(cache_file, "r") as old:
                    for name in old:
                        old.copy(old[name], out, name=name)
            group = out.require_group(key)
            group.create_dataset("embeddings", data=embeddings.numpy())
            group.create_dataset("class_names", data=list(class_names), dtype=h5py.string_dtype())
            group.create_dataset("templates", data=list(templates), dtype=h5py.string_dtype())
            group.attrs["model_id"] = model_id
    return embeddings
