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
    """Sigmoid focal loss against one-hot targets, summed over classes, averaged over boxes.

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
    logits, labels = logits[keep].float(), labels[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    if int(labels.max()) >= logits.shape[-1]:
        raise ValueError(f"label {int(labels.max())} outside a vocabulary of {logits.shape[-1]} classes")
    targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / labels.numel()
