"""RegionSpot's training loss: sigmoid focal loss over the dataset's own vocabulary."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def region_focal_loss(
    logits: Tensor,
    labels: Tensor,
    valid: Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss against one-hot targets, reduced per image as the reference does.

    Per image: summed over classes, averaged over that image's counted boxes; then summed over
    the images of the batch (the reference's per-GPU batch; DDP averages over GPUs). Padded
    queries and unknown labels are not counted (the reference repeats an image's own boxes as
    padding instead, which re-weights them; masked padding leaves each box's weight 1/N).

    Args:
        logits: [B, N, C] region-class logits.
        labels: [B, N] int64 class index in [0, C); negative means unknown (excluded).
        valid: [B, N] bool, False for padded queries (excluded). None means all real.

    Returns:
        Scalar loss; 0 (with a gradient path) when no box is counted.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    keep = labels >= 0
    if valid is not None:
        keep = keep & valid
    if not keep.any():
        return logits.sum() * 0.0
    if int(labels[keep].max()) >= logits.shape[-1]:
        raise ValueError(f"label {int(labels[keep].max())} outside a vocabulary of {logits.shape[-1]} classes")
    logits = logits.float()
    targets = F.one_hot(labels.clamp(min=0), logits.shape[-1]).to(logits.dtype)
    per_box = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").sum(-1)
    counted = keep.to(per_box.dtype)
    per_image = (per_box * counted).sum(1) / counted.sum(1).clamp(min=1.0)  # [B]
    return per_image.sum()
