"""Frozen SAM 2.1: its model config, building it from a checkpoint, and its input transform
(:class:`Sam2Transform`).

The model is built as ``sam2.build_sam.build_sam2`` builds it for images: the Hydra config's
``model`` node instantiated, with the post-processing settings that ``apply_postprocessing=True``
adds (a single mask that is unstable falls back to the best of the three multimask outputs).
Its checkpoint is read here, with ``torch.load(weights_only=True)`` and checked against the
config before anything is built. The model itself, as a promptable segmenter, is
:class:`~regionspot_pl.backbones.sam2_segmenter.Sam2Segmenter`.

``sam2``, Hydra and OmegaConf are imported when a SAM 2 is built, not when a command reads its
settings.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .common import BackboneError, BackboneNotFoundError, frozen_with_weights
from .image import check_rgb_uint8

SAM2_TYPES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")

OFFICIAL_SAM2_CHECKPOINTS = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
}

# What build_sam2(..., apply_postprocessing=True) sets on every config it builds for images (as
# "++model.sam_mask_decoder_extra_args.KEY=VALUE" overrides).
IMAGE_POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}

# SAM2Transforms' pixel normalization (ImageNet's), applied to pixels in [0, 1].
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)

# A first-level key every SAM 2 state dict holds (Hiera's patch embedding).
_PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"


def is_sam2_type(sam_type: str) -> bool:
    """A packaged SAM 2.1 name, or the path of a SAM 2 model config YAML."""
    return sam_type in SAM2_TYPES or str(sam_type).endswith(".yaml")


def _sam2_package() -> Path:
    """The installed ``sam2`` package's folder (its configs live there)."""
    try:
        import sam2
    except ImportError as err:
        raise BackboneError(
            f"a SAM 2 --sam_type needs the sam2 package ({err}): run `make install`, which builds it "
            "without its optional CUDA extension"
        ) from None
    return Path(sam2.__file__).parent


def config_path(sam_type: str) -> Path:
    """The YAML of ``sam_type``: the packaged ``configs/sam2.1/<type>.yaml``, or the path given."""
    if sam_type in SAM2_TYPES:
        return _sam2_package() / "configs" / "sam2.1" / f"{sam_type}.yaml"
    return Path(sam_type)


def _targets(node: Any) -> list[str]:
    """Every ``_target_`` in a config tree (what Hydra would import and call)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for key in node if key != "_target_" for t in _targets(node[key])]
    if isinstance(node, ListConfig):
        return [t for item in node for t in _targets(item)]
    return []


def sam2_config(sam_type: str) -> Any:
    """The model config of ``sam_type`` as ``build_sam2`` composes it for images: the YAML, with
    ``IMAGE_POSTPROCESSING`` under ``model.sam_mask_decoder_extra_args``, interpolations resolved.

    A YAML outside the package is instantiated only if every ``_target_`` in it is one of
    ``sam2``'s classes: Hydra calls whatever a config names, and a config is data, not code.
    """
    _sam2_package()  # its absence is the first thing to say
    from omegaconf import DictConfig, OmegaConf

    path = config_path(sam_type)
    if not path.is_file():
        raise BackboneNotFoundError(
            f"SAM 2 model config {str(path)!r} not found: --sam_type takes {', '.join(SAM2_TYPES)} or the "
            "path of a SAM 2 model config .yaml"
        )
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors, unreadable files
        raise BackboneError(f"--sam_type {path}: not a readable YAML ({err})") from None
    model = cfg.get("model") if isinstance(cfg, DictConfig) else None
    targets = _targets(model) if isinstance(model, DictConfig) else []
    if not targets or not str(model.get("_target_", "")).startswith("sam2.modeling"):
        raise BackboneError(
            f"--sam_type {path}: not a SAM 2 model config (no `model:` with a `_target_` of sam2.modeling); "
            "pass a config from the sam2 package's configs/ or one in its layout"
        )
    foreign = sorted({t for t in targets if not t.startswith("sam2.")})
    if foreign:
        raise BackboneError(
            f"--sam_type {path}: names {foreign[0]!r} as a _target_; only sam2's own classes are built from a config"
        )
    cfg = OmegaConf.merge(cfg, {"model": {"sam_mask_decoder_extra_args": IMAGE_POSTPROCESSING}})
    OmegaConf.resolve(cfg)
    return cfg


def _trunk_signature(cfg: Any) -> tuple[int, int] | None:
    """(Hiera embed dim, number of blocks) a config builds: its trunk's values, else Hiera's
    defaults (the packaged b+ config leaves ``stages`` to them); None for a trunk that is not
    Hiera (then only loading the state dict checks it)."""
    from sam2.modeling.backbones.hieradet import Hiera

    trunk = cfg.model.image_encoder.trunk
    if trunk.get("_target_") != f"{Hiera.__module__}.{Hiera.__name__}":
        return None
    defaults = inspect.signature(Hiera).parameters
    embed_dim = trunk.get("embed_dim", defaults["embed_dim"].default)
    stages = trunk.get("stages", defaults["stages"].default)
    return int(embed_dim), int(sum(stages))


def _state_signature(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(Hiera embed dim, number of blocks) of a SAM 2 state dict."""
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    return int(state[_PATCH_EMBED].shape[0]), len(blocks)


def _expected_file(sam_type: str) -> str:
    """What ``--sam_checkpoint`` should be for ``sam_type``, for error messages."""
    if sam_type in SAM2_TYPES:
        return f"the official {OFFICIAL_SAM2_CHECKPOINTS[sam_type]} (from the SAM 2 release)"
    return f"the checkpoint trained with {Path(sam_type).name}"


def _guess(signature: tuple[int, int]) -> str:
    """Which packaged type a state dict's trunk signature is, in words."""
    from omegaconf import OmegaConf

    for name in SAM2_TYPES:
        if _trunk_signature(OmegaConf.load(config_path(name))) == signature:
            return f"it looks like --sam_type {name}"
    return "it matches no packaged SAM 2.1 type"


def _load_failure(err: Exception) -> str:
    """``torch.load``'s error in a few words: its own text spans lines and advises loading the
    file unrestricted, which this package never does."""
    if "Unsupported global" in str(err):
        return "it pickles objects other than tensors, which are never unpickled"
    return f"not a readable PyTorch file ({type(err).__name__})"


def read_sam2_checkpoint(checkpoint: str | Path, sam_type: str, cfg: Any) -> dict[str, torch.Tensor]:
    """The state dict of an official-format SAM 2 checkpoint (``{"model": state_dict}``),
    read weights-only and checked against ``cfg``'s image encoder; each problem is one
    :class:`~.common.BackboneError` naming the file, the type and the fix."""
    path, expected = Path(checkpoint), _expected_file(sam_type)
    where = f"checkpoint {str(path)!r} (--sam_type {sam_type})"
    if not path.is_file():
        raise BackboneNotFoundError(
            f"SAM 2 checkpoint {str(path)!r} not found; --sam_type {sam_type} expects {expected} and its path in "
            "--sam_checkpoint"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles of other objects, truncated files, ...
        raise BackboneError(
            f"{where} could not be read as a weights-only SAM 2 checkpoint: {_load_failure(err)}; expected {expected}"
        ) from None
    state = content.get("model") if isinstance(content, dict) else None
    if not isinstance(state, dict) or _PATCH_EMBED not in state:
        sam1 = isinstance(content, dict) and "image_encoder.pos_embed" in content
        hint = "it is a SAM (segment-anything) state dict: pass its --sam_type (vit_b, vit_l, vit_h, tiny)"
        raise BackboneError(
            f"{where} is not a SAM 2 checkpoint (a {{'model': state_dict}} file with {_PATCH_EMBED!r}); "
            + (hint if sam1 else f"expected {expected}")
        )
    wanted, found = _trunk_signature(cfg), _state_signature(state)
    if wanted is not None and found != wanted:
        raise BackboneError(
            f"{where} does not fit: image encoder width/blocks {found}, the config asks for {wanted}; {_guess(found)}"
        )
    return state


def build_sam2_model(sam_type: str, checkpoint: str | Path | None) -> Any:
    """Build a frozen SAM 2 (``sam2.modeling.sam2_base.SAM2Base``) of ``sam_type`` and load
    ``checkpoint``; ``None`` leaves the random initialization (benchmarks, the tiny writer).

    ``build_sam2``'s own loader is not used: it gives no error that names a wrong file or type.

    Returns:
        the model in eval mode, ``requires_grad`` False on every parameter.
    """
    cfg = sam2_config(sam_type)
    state = None if checkpoint is None else read_sam2_checkpoint(checkpoint, sam_type, cfg)
    from hydra.utils import instantiate

    return frozen_with_weights(instantiate(cfg.model, _recursive_=True), state, checkpoint, sam_type)


class Sam2Transform:
    """SAM 2's input transform (``SAM2Transforms``), without the model: picklable, so DataLoader
    workers can use it. (A ``SegmenterTransform``.)

    SAM 2 resizes the whole image to ``image_size`` x ``image_size`` (aspect not kept, no
    padding), on float pixels in [0, 1] with torchvision's antialiased bilinear resize; so
    ``resize`` keeps the uint8 pixels as they are ([3, h, w], a quarter of float32's bytes to
    cross to the device) and ``normalize_and_pad`` does ``SAM2Transforms.__call__`` there:
    to [0, 1], resize, ImageNet mean/std. Prompts scale by (S / w, S / h)
    (``SAM2Transforms.transform_coords`` with ``normalize=True``).
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, H, W] uint8, the same pixels (SAM 2 resizes float pixels)."""
        check_rgb_uint8(image, "SAM 2")
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()

    def normalize_and_pad(self, resized: torch.Tensor) -> torch.Tensor:
        """[3, h, w] uint8 from ``resize`` -> [3, S, S] float32 on the same device:
        ``ToTensor`` (/ 255), ``Resize((S, S))`` (bilinear, antialiased), ``Normalize``."""
        x = resized.to(torch.get_default_dtype()).div(255)
        x = TF.resize(x, [self.image_size, self.image_size], InterpolationMode.BILINEAR, antialias=True)
        return TF.normalize(x, SAM2_MEAN, SAM2_STD)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> [3, S, S] float32 (``resize`` then ``normalize_and_pad``)."""
        return self.normalize_and_pad(self.resize(image))

    def unpadded_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(S, S): every image fills SAM 2's square input."""
        return self.image_size, self.image_size

    def apply_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[..., 2] x, y in pixels of an (H, W) image -> SAM 2's input frame (x / W * S, y / H * S)."""
        h, w = image_size
        coords = coords.clone()
        coords[..., 0] = coords[..., 0] / w
        coords[..., 1] = coords[..., 1] / h
        return coords * self.image_size

    def apply_boxes(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[N, 4] xyxy in pixels of an (H, W) image -> SAM 2's input frame (both corners as points)."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), image_size).reshape(-1, 4)
