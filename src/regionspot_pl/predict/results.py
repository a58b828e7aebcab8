"""The result dicts of :meth:`~.predictor.Predictor.predict`: built from the head's
probabilities and SAM's outputs, reduced to one candidate, and boxed."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .prompts import RegionPrompt


def best_candidate(result: dict[str, Any]) -> dict[str, Any]:
    """A multimask result reduced to its candidate of highest predicted IoU (as a single-mask
    result: ``labels``, ``scores``, ``mask``, ``iou``, ``attention``); others as they are."""
    if "masks" not in result:
        return result
    j = int(np.argmax(result["iou"]))
    best = {k: v for k, v in result.items() if k != "masks"}
    best.update(labels=result["labels"][j], scores=result["scores"][j],
                mask=result["masks"][j], iou=result["iou"][j])  # fmt: skip
    if "attention" in result:
        best["attention"] = result["attention"][j]
    return best


def region_box(result: dict[str, Any]) -> list[float]:
    """The region's prompt box, else the box around its mask, else around its points."""
    if result.get("box") is not None:
        return result["box"]
    mask = result.get("mask")
    if mask is not None and mask.any():
        rows, cols = np.nonzero(mask)
        return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
    xy = np.asarray(result["point_coords"], dtype=np.float64)
    return [*xy.min(0).tolist(), *xy.max(0).tolist()]


def named_regions(
    prompts: list[RegionPrompt],
    names: list[str],
    probs: Tensor,
    topk: int,
    masks: Tensor,
    iou: Tensor,
    attention: Tensor | None,
    embeddings: Tensor | None = None,
) -> list[dict[str, Any]]:
    """One result dict per prompt (see :meth:`Predictor.predict`): its ``topk`` best names,
    their probabilities, SAM's mask(s) and predicted IoU, the attention and the (normalized)
    embedding if given."""
    k = min(topk, len(names))
    # stable sort: equal probabilities keep vocabulary order, as score_regions does
    top_p, top_i = probs.sort(dim=-1, descending=True, stable=True)
    top_p, top_i = top_p[..., :k].tolist(), top_i[..., :k].tolist()
    masks_np, iou_list = masks.cpu().numpy(), iou.cpu().tolist()
    multimask = masks_np.ndim == 4
    results = []
    for n, prompt in enumerate(prompts):
        result = prompt.describe()
        if multimask:
            result["labels"] = [[names[i] for i in row] for row in top_i[n]]
            result.update(scores=top_p[n], masks=masks_np[n], iou=iou_list[n])
        else:
            result["labels"] = [names[i] for i in top_i[n]]
            result.update(scores=top_p[n], mask=masks_np[n], iou=iou_list[n])
        if attention is not None:
            result["attention"] = attention[n].numpy()
        if embeddings is not None:
            result["embedding"] = embeddings[n].numpy()
        results.append(result)
    return results
