"""Frozen CLIP (Hugging Face transformers): image feature map, text embeddings and their cache.

RegionSpot's key/value tokens are CLIP's vision ``last_hidden_state`` for the whole image resized
to a square (class token first, before the post layer norm); its classifier weights are the
template-averaged, L2-normalized text embeddings of the class names. Text embeddings depend only
on (model, vocabulary, templates), so they are computed once and kept in an HDF5 cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF
from transformers import AutoTokenizer, CLIPModel

from ..utils.io import AtomicFile, FolderLock
from .common import BackboneError, BackboneNotFoundError
from .templates import TEMPLATES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Suffixes the reference strips from class names before prompting (COCO-panoptic style names).
_NAME_SUFFIXES = ("-other", "-merged", "-stuff")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Names the way prompts are made (name handling + templates); part of every text-cache key.
PROMPT_PROTOCOL = "reference-prompts-v2"


def load_clip(model_dir: str | Path) -> tuple[CLIPModel, transformers.PreTrainedTokenizerBase]:
    """Load a CLIP model + tokenizer saved with ``save_pretrained`` from a local directory.

    Offline only (``local_files_only=True``). The model is returned in eval mode and frozen.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise BackboneNotFoundError(
            f"CLIP directory {str(path)!r} not found; pass a local directory holding a Hugging "
            "Face CLIP snapshot (config.json, model.safetensors, tokenizer files), e.g. one "
            "saved by CLIPModel.save_pretrained or written by `python -m regionspot_pl.tiny DIR`"
        )
    config_file = path / "config.json"
    model_type = None
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise BackboneError(f"{config_file} is not a CLIP config (a JSON object): {err}") from err
    if model_type != "clip":
        raise BackboneError(
            f"{str(path)!r} is not a CLIP directory: config.json "
            f"{'missing' if model_type is None else f'has model_type {model_type!r}'}; expected "
            "a Hugging Face snapshot of e.g. openai/clip-vit-base-patch16 (model_type 'clip')"
        )
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:  # missing or truncated weights, bad config
        raise BackboneError(f"the CLIP model in {str(path)!r} could not be loaded: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"{str(path)!r} holds no loadable tokenizer ({err}); save one next to the model "
            "with tokenizer.save_pretrained(dir)"
        ) from err
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def clip_preprocess(
    image: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """[3, H, W] uint8 (or float in [0, 1]) -> [3, size, size] normalized float32.

    The whole image is resized to a square (no crop, aspect ratio not kept) with torchvision's
    tensor ``resize``, bilinear and WITHOUT antialiasing: what the reference ran (torchvision
    < 0.17 did not antialias tensors); then ``(x - mean) / std`` per channel (CLIP's by
    default). Runs on the input's device.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"clip_preprocess expects a [3, H, W] image, got {tuple(image.shape)}; "
            "permute an HxWx3 array with .permute(2, 0, 1)"
        )
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    x = TF.resize(x, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean_t) / std_t


def clean_class_name(name: str) -> str:
    """The reference's only change to a class name before prompting: drop the substrings
    '-other', '-merged' and '-stuff'. Underscores and parentheses stay (LVIS 'aerosol_can'
    gives 'a photo of a aerosol_can.'), as the published weights were trained and tested."""
    for suffix in _NAME_SUFFIXES:
        name = name.replace(suffix, "")
    return name


def _pooled(output: torch.Tensor | object) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor; 5.x returns a
    # BaseModelOutputWithPooling whose pooler_output holds them.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEncoder(nn.Module):
    """Frozen Hugging Face CLIP as a :class:`~regionspot_pl.backbones.interfaces.VisionLanguageModel`:
    vision feature map, L2-normalized text and image embeddings.

    Attributes:
        vision_dim: vision transformer width (768 for ViT-B/16, 1024 for ViT-L/14).
        text_dim: joint embedding dim (``projection_dim``; 512 for B/16, 768 for L/14).
        image_size: square input side of the vision model.
        grid: side of the patch grid (image_size / patch_size).
        num_tokens: 1 + grid^2, class token included.
        mean, std: CLIP's pixel normalisation (of pixels in [0, 1]).
    """

    def __init__(self, model: CLIPModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.vision_dim: int = int(vision.hidden_size)
        self.text_dim: int = int(model.config.projection_dim)
        self.image_size: int = int(vision.image_size)
        self.grid: int = self.image_size // int(vision.patch_size)
        self.num_tokens: int = 1 + self.grid**2
        self.mean, self.std = CLIP_MEAN, CLIP_STD

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> float:
        """exp of CLIP's learnt log temperature (100 for the released models)."""
        return float(self.model.logit_scale.detach().exp())

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] uint8 -> [3, image_size, image_size] float32 (``clip_preprocess``), on the image's device."""
        return clip_preprocess(image, self.image_size, self.mean, self.std)

    def compile(self) -> None:
        """torch.compile the vision tower in place (same results up to float rounding)."""
        self.model.vision_model = torch.compile(self.model.vision_model)

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"CLIP expects pixel_values [B, 3, {self.image_size}, {self.image_size}] from "
                f"clip_preprocess(image, {self.image_size}), got {tuple(pixel_values.shape)}"
            )
        return pixel_values.to(self.device)

    @torch.no_grad()
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_tokens, vision_dim]: last encoder layer, class token first,
        before the post layer norm (HF ``vision_model(...).last_hidden_state``)."""
        pixel_values = self._check_pixels(pixel_values)
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()
    def encode_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, text_dim] L2-normalized CLIP image embeddings (crop baselines)."""
        pixel_values = self._check_pixels(pixel_values)
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)

    @torch.no_grad()
    def encode_texts(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] = TEMPLATES,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Class names -> [C, text_dim] L2-normalized, template-averaged text embeddings.

        Per class: clean the name, fill every template, encode all prompts with
        ``get_text_features``, average the *un-normalized* features, then L2-normalize.
        Prompts of all classes go through the text model ``batch_size`` at a time.
        """
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings each containing '{}'")
        prompts = [t.format(clean_class_name(c)) for c in class_names for t in templates]
        max_length = int(self.model.config.text_config.max_position_embeddings)
        features = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(
                prompts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            features.append(
                _pooled(
                    self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                ).float()
            )
        if not features:
            return torch.zeros(0, self.text_dim, device=self.device)
        per_prompt = torch.cat(features).view(len(class_names), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)


def model_identity(model_dir: str | Path) -> str:
    """Short stable id of a CLIP snapshot: sha256 over its weight files, 16 hex characters."""
    path = Path(model_dir)
    files = sorted({f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)})
    if not files:
        raise BackboneNotFoundError(
            f"no weight files ({', '.join(_WEIGHT_PATTERNS)}) in {str(path)!r}; "
            "is it a CLIP snapshot saved with save_pretrained?"
        )
    digest = hashlib.sha256()
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
    encoder: ClipEncoder,
    class_names: Sequence[str],
    cache_file: str | Path,
    model_id: str,
    templates: Sequence[str] = TEMPLATES,
) -> torch.Tensor:
    """Template-averaged text embeddings [C, text_dim] float32 (CPU), through an HDF5 cache.

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
