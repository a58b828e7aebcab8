"""What every frozen Hugging Face vision-language model shares: reading its folder, preparing
the image, encoding class names, and :class:`FrozenVisionLanguageModel`, the base of the
families (:mod:`.clip`: CLIP, MetaCLIP 2; :mod:`.siglip`: SigLIP).

A family differs from the others only in its model class, the global token it puts first in the
feature map, how its text tower is tokenized, and its pixel normalisation when the folder does not
state one; the rest (the square resize, the template average, the checks) is here, once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import functional as TF
from transformers import AutoTokenizer, PreTrainedModel

from .common import BackboneError, BackboneNotFoundError
from .templates import TEMPLATES

# Suffixes the reference strips from class names before prompting (COCO-panoptic style names).
_NAME_SUFFIXES = ("-other", "-merged", "-stuff")
PREPROCESSOR_CONFIG = "preprocessor_config.json"
Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


def read_model_type(model_dir: str | Path) -> str | None:
    """The ``model_type`` in a model folder's config.json; None when there is no config.json.

    Raises:
        BackboneNotFoundError: the folder does not exist.
        BackboneError: config.json is not a JSON object.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise BackboneNotFoundError(
            f"CLIP directory {str(path)!r} not found; pass a local directory holding a Hugging "
            "Face snapshot of a vision-language model (config.json, model.safetensors, tokenizer files), e.g. "
            "one saved by CLIPModel.save_pretrained or written by `python -m regionspot_pl.tiny DIR`"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise BackboneError(f"{config_file} is not a model config (a JSON object): {err}") from err


def load_hf_folder(
    model_dir: str | Path, model_type: str, model_class: type[PreTrainedModel], name: str, example: str
) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load a ``model_class`` + tokenizer saved with ``save_pretrained`` in a local folder whose
    config.json has ``model_type``; ``name`` and ``example`` (a hub id) word the errors.

    Offline only (``local_files_only=True``). The model is returned in eval mode and frozen.
    """
    path = Path(model_dir)
    found = read_model_type(path)
    if found != model_type:
        raise BackboneError(
            f"{str(path)!r} is not a {name} directory: config.json "
            f"{'missing' if found is None else f'has model_type {found!r}'}; expected "
            f"a Hugging Face snapshot of e.g. {example} (model_type {model_type!r})"
        )
    try:
        model = model_class.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:  # missing or truncated weights, bad config
        raise BackboneError(f"the {name} model in {str(path)!r} could not be loaded: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except ImportError as err:  # e.g. SigLIP's SentencePiece tokenizer without the sentencepiece package
        raise BackboneError(
            f"the tokenizer in {str(path)!r} needs a package that is not installed ({' '.join(str(err).split())}); "
            "install it (SigLIP's SiglipTokenizer: pip install sentencepiece protobuf)"
        ) from err
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"{str(path)!r} holds no loadable tokenizer ({' '.join(str(err).split())}); save one next to the model "
            "with tokenizer.save_pretrained(dir)"
        ) from err
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def read_normalisation(model_dir: str | Path, default: Normalisation | None) -> Normalisation:
    """(mean, std) of pixels in [0, 1]: ``image_mean``/``image_std`` of the folder's
    preprocessor_config.json; ``default`` when the file or the keys are absent (an error when
    ``default`` is None)."""
    config_file = Path(model_dir) / PREPROCESSOR_CONFIG
    config: dict = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BackboneError(f"{config_file} is not an image processor config (JSON): {err}") from err
    if not isinstance(config, Mapping):
        raise BackboneError(f"{config_file} is not an image processor config (a JSON object)")
    if "image_mean" not in config and "image_std" not in config:
        if default is None:
            raise BackboneError(
                f"{str(model_dir)!r} states no pixel normalisation: its {PREPROCESSOR_CONFIG} is missing or has no "
                "image_mean/image_std; save the model's image processor next to it (processor.save_pretrained(dir))"
            )
        return default
    mean, std = (_three_numbers(config.get(key), key, config_file) for key in ("image_mean", "image_std"))
    if min(std) <= 0:
        raise BackboneError(f"{config_file}: image_std {list(std)} must be positive")
    return mean, std


def _three_numbers(value: object, key: str, config_file: Path) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise BackboneError(f"{config_file}: {key} must be a list of 3 numbers (R, G, B), got {value!r}")
    return float(value[0]), float(value[1]), float(value[2])


def square_preprocess(image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[3, H, W] uint8 (or float in [0, 1]) -> [3, size, size] normalized float32.

    The whole image is resized to a square (no crop, aspect ratio not kept) with torchvision's
    tensor ``resize``, bilinear and WITHOUT antialiasing: what the reference ran for CLIP
    (torchvision < 0.17 did not antialias tensors), for every family; then ``(x - mean) / std``
    per channel. Runs on the input's device.
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


def pooled(output: torch.Tensor | object) -> torch.Tensor:
    """The pooled features of a ``get_text_features`` / ``get_image_features`` call:
    transformers < 5 returns them as a tensor; 5.x returns a BaseModelOutputWithPooling whose
    pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class FrozenVisionLanguageModel(nn.Module):
    """A frozen Hugging Face vision-language model as a
    :class:`~regionspot_pl.backbones.interfaces.VisionLanguageModel`: feature map (global token
    first), L2-normalized text and image embeddings. A family subclass names its model class and
    implements ``joint_dim``, ``_feature_map`` and ``_tokenize``.

    Attributes:
        vision_dim: vision transformer width (``vision_config.hidden_size``).
        text_dim: joint embedding dim (``joint_dim``).
        image_size: square input side of the vision model.
        grid: side of the patch grid (image_size // patch_size).
        num_tokens: 1 + grid^2, the global token included.
        mean, std: the pixel normalisation (of pixels in [0, 1]) the model was trained with.
    """

    family: ClassVar[str]  # the model_type of its config.json
    name: ClassVar[str]  # what errors call it
    example: ClassVar[str]  # a hub id of one, for errors
    model_class: ClassVar[type[PreTrainedModel]]
    default_normalisation: ClassVar[Normalisation | None] = None  # when the folder states none

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.vision_dim: int = int(vision.hidden_size)
        self.text_dim: int = self.joint_dim(model.config)
        self.image_size: int = int(vision.image_size)
        self.grid: int = self.image_size // int(vision.patch_size)
        self.num_tokens: int = 1 + self.grid**2
        self.mean, self.std = tuple(mean), tuple(std)

    @classmethod
    def from_folder(cls, model_dir: str | Path) -> FrozenVisionLanguageModel:
        """The model saved in the local folder ``model_dir`` (``load_hf_folder``), normalised as its
        preprocessor_config.json says (``read_normalisation``)."""
        model, tokenizer = load_hf_folder(model_dir, cls.family, cls.model_class, cls.name, cls.example)
        return cls(model, tokenizer, *read_normalisation(model_dir, cls.default_normalisation))

    @staticmethod
    def joint_dim(config: transformers.PretrainedConfig) -> int:
        """Width of the joint image-text embedding space, from the model's config."""
        raise NotImplementedError

    def _feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] on the device -> [B, num_tokens, vision_dim], the global token first."""
        raise NotImplementedError

    def _tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> the ``get_text_features`` inputs the model was trained with (CPU tensors)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> float:
        """exp of the model's learnt log temperature (100 for the released CLIPs)."""
        return float(self.model.logit_scale.detach().exp())

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[3, H, W] uint8 -> [3, image_size, image_size] float32 (``square_preprocess`` with this
        model's mean and std), on the image's device."""
        return square_preprocess(image, self.image_size, self.mean, self.std)

    def compile(self) -> None:
        """torch.compile the vision tower in place (same results up to float rounding)."""
        self.model.vision_model = torch.compile(self.model.vision_model)

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} expects pixel_values [B, 3, {self.image_size}, {self.image_size}] from "
                f"clip_preprocess(image, {self.image_size}), got {tuple(pixel_values.shape)}"
            )
        return pixel_values.to(self.device)

    @torch.no_grad()
    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, num_tokens, vision_dim]: the family's global token, then the
        vision tower's ``last_hidden_state`` (docs/fidelity.md, "Vision-language families")."""
        return self._feature_map(self._check_pixels(pixel_values))

    @torch.no_grad()
    def encode_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, text_dim] L2-normalized image embeddings, what the model's own
        ``get_image_features`` gives (the crop baselines)."""
        pixel_values = self._check_pixels(pixel_values)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=pixel_values)), dim=-1)

    @torch.no_grad()
    def encode_texts(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] = TEMPLATES,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Class names -> [C, text_dim] L2-normalized, template-averaged text embeddings.

        Per class: clean the name, fill every template, encode all prompts with
        ``get_text_features`` (tokenized as the family was trained, ``_tokenize``), average the
        *un-normalized* features, then L2-normalize. Prompts of all classes go through the text
        model ``batch_size`` at a time.
        """
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings each containing '{}'")
        prompts = [t.format(clean_class_name(c)) for c in class_names for t in templates]
        features = []
        for start in range(0, len(prompts), batch_size):
            inputs = {k: v.to(self.device) for k, v in self._tokenize(prompts[start : start + batch_size]).items()}
            features.append(pooled(self.model.get_text_features(**inputs)).float())
        if not features:
            return torch.zeros(0, self.text_dim, device=self.device)
        per_prompt = torch.cat(features).view(len(class_names), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)
