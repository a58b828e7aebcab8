"""Step 3 of a test run (:mod:`.zero_shot`): the logits, image by image, in shard order: the head
over the cached features (:func:`regionspot_logits`, through the steps fit's validation shares,
:func:`.scoring.batch_logits`), or CLIP over each box's crop for the baselines of Table 1
(:func:`baseline_logits`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..backbones.image import ImageReadError, read_image, resolve_image_path
from ..backbones.vlm import FrozenVisionLanguageModel
from ..cache.shards import iter_samples
from ..model.head import RegionSpotHead
from ..train.datamodule import collate_regions
from ..utils.io import batched
from .baselines import box_crops, crop_logits
from .prepare import TestError
from .saved_logits import ImageLogits
from .scoring import batch_logits

__all__ = ["ImageLogits", "baseline_logits", "regionspot_logits"]


def regionspot_logits(
    head: RegionSpotHead, shards: list[str], texts: Tensor, device: torch.device, batch_size: int
) -> Iterator[ImageLogits]:
    """The head over the cached split, ``batch_size`` images at a time (boxes padded; an image's
    logits do not depend on the batch it lands in)."""
    texts = texts.to(device)
    for chunk in batched(iter_samples(shards), batch_size):
        for s in chunk:
            s["dataset_index"] = 0  # collate_regions checks one vocabulary per batch
        batch = collate_regions(chunk).to(device)
        with torch.inference_mode():
            logits = batch_logits(head, batch, texts).cpu()  # [B, N, C]
        for i, s in enumerate(chunk):
            n = len(s["labels"])  # collate keeps every box in order: the first n rows are real
            yield ImageLogits(
                int(s["meta"]["image_id"]), s["boxes"], s["scores"], s["iou"], logits[i, :n], s["meta"].get("masks")
            )


def _identity(item: Any) -> Any:
    return item


class _CropStream(IterableDataset):
    """Decodes each image of the shards and crops its boxes, in DataLoader workers.

    Shards are dealt to workers (shard i to worker i mod workers), so each image is read once.
    A bad image yields ``{"error": message}``, raised as a clean error by the main process.
    """

    def __init__(self, shards: list[str], images: str, encoder: FrozenVisionLanguageModel, with_masks: bool) -> None:
        self.shards, self.images, self.with_masks = shards, Path(images), with_masks
        self.size, self.mean, self.std = encoder.image_size, encoder.mean, encoder.std  # not the model: workers copy

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards[info.id :: info.num_workers] if info else self.shards
        for s in iter_samples(mine) if mine else ():
            meta = s["meta"]
            try:
                path = resolve_image_path(self.images, meta["file_name"])
                image, _raw = read_image(path, (meta["height"], meta["width"]))
            except ImageReadError as err:  # missing, unreadable or resized: probably the wrong folder
                yield {
                    "error": f"{err}; the crop baselines need the original images: pass --images DIR, "
                    "the folder the shards were extracted from"
                }
                return
            masks = meta.get("masks")
            crops = box_crops(image, s["boxes"], self.size, masks if self.with_masks else None, self.mean, self.std)
            yield {
                "image_id": int(meta["image_id"]),
                "boxes": s["boxes"],
                "scores": s["scores"],
                "iou": s["iou"],
                "masks": masks,
                "crops": crops,
            }


def baseline_logits(
    encoder: FrozenVisionLanguageModel,
    shards: list[str],
    texts: Tensor,
    images: str,
    with_masks: bool,
    batch_size: int,
    workers: int,
) -> Iterator[ImageLogits]:
    """CLIP on each box's crop (masked outside the SAM mask when ``with_masks``), batched over
    the boxes of consecutive images: ``batch_size`` crops per CLIP forward."""
    loader = DataLoader(
        _CropStream(shards, images, encoder, with_masks),
        batch_size=None,
        num_workers=min(workers, len(shards)),
        collate_fn=_identity,
    )
    pending: list[dict] = []

    def flush() -> Iterator[ImageLogits]:
        logits = crop_logits(encoder, torch.cat([p["crops"] for p in pending]), texts, batch_size)
        for p, part in zip(pending, logits.split([len(p["boxes"]) for p in pending])):
            yield ImageLogits(p["image_id"], p["boxes"], p["scores"], p["iou"], part, p["masks"])
        pending.clear()

    for item in loader:
        if "error" in item:
            raise TestError(item["error"])
        pending.append(item)
        if sum(len(p["boxes"]) for p in pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()
