"""A tiny random SAM 2.1 in the official formats: a model config YAML in SAM 2's Hydra layout
and a ``{"model": state_dict}`` checkpoint, for tests and CPU smoke runs
(``--sam_type DIR/sam2.1_hiera_tiny_random.yaml --sam_checkpoint DIR/sam2.1_hiera_tiny_random.pt``).

The config is the packaged ``sam2.1_hiera_t.yaml`` with a smaller Hiera and a smaller memory
path: still a ``SAM2Base`` that Hydra builds and ``SAM2ImagePredictor`` accepts. What stays:
``image_size`` 1024 (the predictor's feature sizes are written for it), the neck's ``d_model``
256 (the SAM heads are 256 wide, so the region token is 256-d as with the real models), and the
SAM prompt encoder and mask decoder, which SAM2Base builds at their real size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .sam2_model import config_path

TINY_SAM2_CONFIG = "sam2.1_hiera_tiny_random.yaml"
TINY_SAM2_CHECKPOINT = "sam2.1_hiera_tiny_random.pt"

# Changes to the packaged sam2.1_hiera_t config (dotted keys under `model`). Hiera: width 16,
# one block per stage but two in the third, whose second block is global (a stage's first block
# pools its input, and a window of 0 there divides by zero); the trunk's widths double per stage,
# so the neck reads 128, 64, 32, 16 channels. One memory-attention layer with a small
# feed-forward, one fuser layer: the video memory is built but never run on images.
TINY_SAM2_OVERRIDES: dict[str, Any] = {
    "image_encoder.trunk.embed_dim": 16,
    "image_encoder.trunk.stages": [1, 1, 2, 1],
    "image_encoder.trunk.global_att_blocks": [3],
    "image_encoder.neck.backbone_channel_list": [128, 64, 32, 16],
    "memory_attention.num_layers": 1,
    "memory_attention.layer.dim_feedforward": 64,
    "memory_encoder.fuser.num_layers": 1,
}


def tiny_sam2_config_text() -> str:
    """The tiny config as YAML text, in the packaged configs' layout (a ``# @package _global_``
    header, everything under ``model``), without the image post-processing settings, which the
    builder adds as ``build_sam2`` does."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path("sam2.1_hiera_t"))
    for key, value in TINY_SAM2_OVERRIDES.items():
        OmegaConf.update(cfg, f"model.{key}", value, merge=False)
    return "# @package _global_\n\n" + OmegaConf.to_yaml(cfg)


def write_tiny_sam2(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny SAM 2.1's config and random weights under ``out_dir`` (same seed, same bytes).

    Returns:
        {"sam2_checkpoint": out_dir/sam2.1_hiera_tiny_random.pt, "sam2_config": out_dir/sam2.1_hiera_tiny_random.yaml}
    """
    from .sam2_model import build_sam2_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, checkpoint = out / TINY_SAM2_CONFIG, out / TINY_SAM2_CHECKPOINT
    config.write_text(tiny_sam2_config_text())
    torch.manual_seed(seed)
    model = build_sam2_model(str(config), None)
    # contiguous clones: saved storages then hold exactly each tensor's bytes
    torch.save({"model": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}, checkpoint)
    return {"sam2_checkpoint": checkpoint, "sam2_config": config}
