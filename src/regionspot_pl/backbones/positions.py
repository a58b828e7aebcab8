"""Fixed 2-D sin-cos position embeddings for the tiny random vision towers (:mod:`.tiny`,
:mod:`.tiny_vlm`), so that their tokens carry where in the image they come from."""

from __future__ import annotations

import torch
from torch import nn


def sincos_position_embedding_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sin-cos position embeddings (MAE style): the first half of the
    channels encode the row, the second half the column, each as sin/cos at dim/4 frequencies."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def give_sincos_positions(embeddings: nn.Module) -> None:
    """Replace a ViT's learnt position embeddings by 2-D sin-cos ones at the patch content's scale.

    ``embeddings``: a Hugging Face vision embeddings module (CLIP's, MetaCLIP 2's, SigLIP's) with
    ``patch_embedding`` (a Conv2d), ``image_size``, ``patch_size`` and ``position_embedding``
    (an Embedding of [leading + grid**2, width]: one leading row for a class token, none for
    SigLIP). With HF's init (std 0.02, far below the patch content) the tokens carry almost no
    location and a head cannot learn to route its cross-attention to a box (on the demo's scenes:
    24% held-out top-1 with HF's init, 43% with these, 8% chance); trained models do carry
    location. The scale is the RMS a unit-variance input gives through the patch embedding,
    sqrt(sum(w^2) / width); a class token gets a zero position.
    """
    weight = embeddings.patch_embedding.weight  # [width, 3, patch, patch]
    width = weight.shape[0]
    grid = embeddings.image_size // embeddings.patch_size
    pos = sincos_position_embedding_2d(grid, width)
    content_rms = weight.double().pow(2).sum().div(width).sqrt()
    pos = pos * (content_rms / pos.double().pow(2).mean().sqrt()).float()
    leading = embeddings.position_embedding.weight.shape[0] - grid**2
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(torch.cat([torch.zeros(leading, width), pos]))
