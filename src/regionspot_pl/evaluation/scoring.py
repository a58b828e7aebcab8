"""The test-time scoring rules: from region-class logits to ranked detections, and the steps
both evaluations share (``test`` and ``fit``'s validation): :func:`batch_logits` (the head over a
batch), :func:`detect` (one image's logits ranked by a rule) and :meth:`ImageDetections.results`
(COCO/LVIS results).

Boxes come from outside (GT boxes or a proposal source); the model only names them. Each
(box, class) pair of an image is a candidate detection; one box may be reported under several
classes. Two rules rank them (``Scoring``):

- ``regionspot`` (:func:`score_regions`), the reference's: the ``CANDIDATES_PER_IMAGE`` = 900
  pairs with the highest class PROBABILITY (softmax over the vocabulary) are kept first, and only
  then is each multiplied by its box's proposal score (1 for GT boxes); the image reports its
  best ``MAX_DETS_PER_IMAGE`` = 300 final scores, all that LVIS scores.
- ``tap`` (:func:`score_regions_tap`), TAP's multi-label rule as its evaluation script computes
  it: pairs of probability > 0.001, scored with SAM's predicted IoU, per-class NMS, and every
  pair at or above the image's 300th-best score. It is the rule of TAP's published LVIS figures.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..model.head import RegionSpotHead, region_logits
from ..utils.io import rle_to_json
from .saved_logits import ImageLogits

if TYPE_CHECKING:
    from ..train.datamodule import RegionBatch

# The reference ranks the (box, class) pairs by probability and keeps 900 before the proposal
# score enters; a pair outside those 900 never becomes a detection, however good its box.
CANDIDATES_PER_IMAGE = 900
# LVIS scores at most 300 detections per image (LVISResults drops the rest), so a longer list
# only costs time and disk.
MAX_DETS_PER_IMAGE = 300

Scoring = Literal["regionspot", "tap"]
SCORINGS: tuple[str, ...] = typing.get_args(Scoring)
# How reports and tables name each rule, so numbers of the two are never confused.
SCORING_NAMES = {
    "regionspot": "regionspot (the reference's rule: 900 pairs by probability, x box score, best 300)",
    "tap": "tap (TAP's multi-label rule: p > 0.001, x SAM's predicted IoU, per-class NMS 0.5, 300th-best kept)",
}
# TAP's rule (tokenize-anything, scripts/eval_cls.py, Predictor.get_results and filter_outputs).
TAP_MIN_PROBABILITY = 0.001  # pairs kept: probability strictly above
TAP_NMS_IOU = 0.5  # per class, a box overlapping a better one by more than this is dropped


def _top(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values and their indices, descending. A stable sort rather than topk():
    GT boxes often tie (equal probabilities), and tied pairs must not be ordered by the kernel."""
    ordered, index = values.sort(descending=True, stable=True)
    return ordered[:k], index[:k]


def _check_logits(logits: Tensor, topk: int) -> int:
    """The number of boxes of one image's [N, C] logits; ValueError for another shape or topk < 1."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C] for one image, got shape {tuple(logits.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return logits.shape[0]


def score_regions(
    logits: Tensor,
    proposal_scores: Tensor | None = None,
    topk: int = MAX_DETS_PER_IMAGE,
    candidates: int = CANDIDATES_PER_IMAGE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank the (box, class) pairs of one image as the reference does and keep the best ``K``.

    1. probability p[n, c] = softmax(logits[n])[c];
    2. keep the ``candidates`` pairs of highest p;
    3. score = p * proposal_scores[n] (1 when ``proposal_scores`` is None, i.e. GT boxes);
    4. keep the ``topk`` best scores.

    Args:
        logits: [N, C] region-class logits of the N boxes over a vocabulary of C classes.
        proposal_scores: [N] confidence of each proposal, or None for GT boxes.
        topk: detections to keep, at most 300 (the most LVIS scores per image).
        candidates: pairs kept by probability before the proposal score enters (900).

    Returns:
        box_idx [K] int64 (row of ``logits``), class_idx [K] int64 (contiguous class index),
        scores [K] float32, sorted by descending score, K = min(topk, 300, candidates, N * C).
        Ties keep the lower flat index (box-major) first, so the ranking is deterministic.
    """
    num_boxes = _check_logits(logits, topk)
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    num_classes = logits.shape[1]
    if proposal_scores is not None and proposal_scores.shape != (num_boxes,):
        raise ValueError(
            f"proposal_scores must be [N] = [{num_boxes}] (one per box), got shape {tuple(proposal_scores.shape)}"
        )
    probs, flat_idx = _top(logits.float().softmax(dim=-1).flatten(), candidates)
    if proposal_scores is not None:
        probs = probs * proposal_scores.to(probs)[flat_idx // num_classes]
    scores, order = _top(probs, min(topk, MAX_DETS_PER_IMAGE))
    flat_idx = flat_idx[order]
    return flat_idx // num_classes, flat_idx % num_classes, scores


def _sqrt32(x: Tensor) -> Tensor:
    """The float32 square root rounded correctly, as NumPy's (TAP's): taken in float64 and rounded
    once to float32, which is exact for a square root; torch's float32 ``sqrt`` on a CPU can be
    one step off."""
    return x.double().sqrt().float()


def score_regions_tap(
    logits: Tensor, boxes: Tensor, predicted_iou: Tensor, topk: int = MAX_DETS_PER_IMAGE
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank the (box, class) pairs of one image as TAP's evaluation does (tokenize-anything,
    ``scripts/eval_cls.py``: ``Predictor.get_results`` then ``filter_outputs``).

    1. probability p[n, c] = softmax(logits[n])[c]; the pairs with p > 0.001, box-major (its
       ``np.where``); no pair, no detection;
    2. the IoU factor: TAP's code multiplies the probabilities as a [K, 1] column by the clipped
       predicted IoUs of the pairs' boxes as a [K] row, so broadcasting makes a [K, K] matrix; its
       NMS ranks by column 0 and it writes the last column. So every pair of the image is ranked by
       ``rank`` = sqrt(p * clip(iou[first], 0, 1)) and scored ``score`` = sqrt(p * clip(iou[last], 0, 1)),
       ``first`` and ``last`` the boxes of the image's first and last pair (float32, as TAP's);
    3. per class, NMS at box IoU 0.5 (torchvision's, a box overlapping a better-ranked one by
       more than 0.5 is dropped; ties in rank go to the lower box index, its sort being stable);
    4. when more than ``topk`` pairs remain, those scoring at least the ``topk``-th best are kept
       (ties kept). The proposal score plays no part: TAP's script scores GT boxes.

    Args:
        logits: [N, C] region-class logits. boxes: [N, 4] xyxy, original pixels.
        predicted_iou: [N] SAM's predicted IoU of each box's mask (any value; clipped to [0, 1]).
        topk: TAP's ``--max-dets`` (300), at most 300.

    Returns:
        box_idx [K], class_idx [K] int64 and scores [K] float32 in the order TAP writes them: by
        class, then by rank (ties by box). K may exceed ``topk`` by ties at the cut; LVIS then
        keeps each image's 300 best in this order, as it does TAP's file.
    """
    num_boxes = _check_logits(logits, topk)
    if boxes.shape != (num_boxes, 4) or predicted_iou.shape != (num_boxes,):
        raise ValueError(
            f"boxes must be [N, 4] and predicted_iou [N] for N = {num_boxes} boxes, got shapes "
            f"{tuple(boxes.shape)} and {tuple(predicted_iou.shape)}"
        )
    probs = logits.detach().float().cpu().softmax(dim=-1)  # on the CPU: its NMS sorts stably there
    box_idx, class_idx = (probs > TAP_MIN_PROBABILITY).nonzero(as_tuple=True)
    if box_idx.numel() == 0:
        return box_idx, class_idx, probs.new_zeros(0)
    p = probs[box_idx, class_idx]
    iou = predicted_iou.detach().float().cpu().clamp(0, 1)
    rank, score = _sqrt32(p * iou[box_idx[0]]), _sqrt32(p * iou[box_idx[-1]])
    # float64 boxes: batched_nms may shift each class's boxes by class * (max coordinate + 1),
    # which in float32 rounds coordinates to 1/8 pixel at LVIS's 1,203 classes
    keep = batched_nms(boxes.detach().double().cpu()[box_idx], rank.double(), class_idx, TAP_NMS_IOU)
    keep = keep.sort().values  # box-major, as TAP's per-class lists
    keep = keep[rank[keep].sort(descending=True, stable=True).indices]
    keep = keep[class_idx[keep].sort(stable=True).indices]
    topk = min(topk, MAX_DETS_PER_IMAGE)
    if len(keep) > topk:
        cut = score[keep].sort(descending=True).values[topk - 1]
        keep = keep[score[keep] >= cut]
    return box_idx[keep], class_idx[keep], score[keep]


def detections_to_results(
    image_id: int,
    boxes_xyxy: Tensor,
    box_idx: Tensor,
    class_idx: Tensor,
    scores: Tensor,
    category_ids: Sequence[int],
    masks_rle: Sequence[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Write one image's detections in COCO/LVIS results format.

    Args:
        image_id: the dataset's image id.
        boxes_xyxy: [N, 4] boxes (x1, y1, x2, y2) in original image pixels.
        box_idx, class_idx, scores: [K] as returned by :func:`score_regions`.
        category_ids: [C] dataset category id of each contiguous class index.
        masks_rle: [N] compressed RLE mask of each box (e.g. SAM's box-prompted mask from
            ``pycocotools.mask.encode``) for mask results, or None for box results.

    Returns:
        K dicts in input order: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
        for box results; for mask results ``"segmentation"`` (str counts) in place of
        ``"bbox"``, as the reference writes them, so LVIS takes each area from its mask.
    """
    if boxes_xyxy.dim() != 2 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"boxes_xyxy must be [N, 4], got shape {tuple(boxes_xyxy.shape)}")
    if not (box_idx.shape == class_idx.shape == scores.shape) or box_idx.dim() != 1:
        raise ValueError(
            "box_idx, class_idx and scores must be [K] each, got shapes "
            f"{tuple(box_idx.shape)}, {tuple(class_idx.shape)}, {tuple(scores.shape)}"
        )
    num_boxes = boxes_xyxy.shape[0]
    if box_idx.numel() and int(box_idx.max()) >= num_boxes:
        raise ValueError(f"box index {int(box_idx.max())} out of range for {num_boxes} boxes")
    if class_idx.numel() and int(class_idx.max()) >= len(category_ids):
        raise ValueError(
            f"class index {int(class_idx.max())} has no category id: category_ids maps only "
            f"{len(category_ids)} classes; pass the vocabulary's full id list"
        )
    if masks_rle is not None and len(masks_rle) != num_boxes:
        raise ValueError(f"masks_rle must hold one RLE per box: {len(masks_rle)} != {num_boxes}")

    boxes = boxes_xyxy.detach().double().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    segms = [rle_to_json(rle) for rle in masks_rle] if masks_rle is not None else None

    results = []
    for b, c, s in zip(box_idx.tolist(), class_idx.tolist(), scores.tolist()):
        det: dict[str, Any] = {"image_id": int(image_id), "category_id": int(category_ids[c])}
        if segms is None:
            det["bbox"] = [float(v) for v in xywh[b]]
        else:
            det["segmentation"] = dict(segms[b])  # own copy: evaluators write into results
        det["score"] = float(s)
        results.append(det)
    return results


def batch_logits(head: RegionSpotHead, batch: RegionBatch, texts: Tensor) -> Tensor:
    """[B, N, C] logits of each region of a collated batch against a vocabulary's text
    embeddings [C, D]. Padded queries are masked out of the self-attention, so an image's logits
    do not depend on the batch it lands in."""
    regions = head(batch.sam, batch.clip, padding_mask=batch.padding_mask)  # [B, N, text_dim]
    return region_logits(regions, texts, head.config.logit_scale)


@dataclass
class ImageDetections:
    """One image's kept (box, class) pairs, as :func:`score_regions` returns them."""

    image_id: int
    boxes: Tensor  # [N, 4] xyxy, original pixels
    box_idx: Tensor  # [K]
    class_idx: Tensor  # [K]
    scores: Tensor  # [K]
    masks: list[dict] | None  # N COCO RLEs of the SAM masks, or None

    def results(self, category_ids: Sequence[int], with_masks: bool = False) -> list[dict[str, Any]]:
        """These detections in COCO/LVIS results format (:func:`detections_to_results`), with each
        box's SAM mask when ``with_masks``."""
        masks = self.masks if with_masks else None
        return detections_to_results(
            self.image_id, self.boxes, self.box_idx, self.class_idx, self.scores, category_ids, masks
        )


def detect(
    image_id: int,
    boxes: Tensor,
    logits: Tensor,
    box_scores: Tensor,
    topk: int = MAX_DETS_PER_IMAGE,
    masks: list[dict] | None = None,
    scoring: Scoring = "regionspot",
    predicted_iou: Tensor | None = None,
) -> ImageDetections:
    """One image's detections: its N boxes [N, 4] and their logits [N, C] ranked by a scoring rule:
    ``regionspot`` (:func:`score_regions`; ``box_scores`` [N], 1 for GT boxes, multiply the
    probabilities) or ``tap`` (:func:`score_regions_tap`, which needs ``predicted_iou`` [N])."""
    if scoring == "regionspot":
        box_idx, class_idx, scores = score_regions(logits, box_scores, topk)
    elif scoring == "tap":
        if predicted_iou is None:
            raise ValueError("the tap scoring needs each box's predicted IoU")
        box_idx, class_idx, scores = score_regions_tap(logits, boxes, predicted_iou, topk)
    else:
        raise ValueError(f"unknown scoring {scoring!r}: one of {', '.join(SCORINGS)}")
    return ImageDetections(int(image_id), boxes, box_idx, class_idx, scores, masks)


def image_detections(
    item: ImageLogits, scoring: Scoring = "regionspot", topk: int = MAX_DETS_PER_IMAGE
) -> ImageDetections:
    """:func:`detect` on one image's :class:`~.saved_logits.ImageLogits` (``test``'s stream, or a
    logits file that ``evaluate`` scores)."""
    boxes, box_scores, iou = (torch.from_numpy(a) for a in (item.boxes, item.scores, item.iou))
    return detect(item.image_id, boxes, item.logits, box_scores, topk, item.masks, scoring, iou)


def batch_detections(logits: Tensor, batch: RegionBatch, topk: int = MAX_DETS_PER_IMAGE) -> list[ImageDetections]:
    """:func:`detect` for each image of a collated batch with boxes (``logits`` [B, N, C] of
    :func:`batch_logits`; padding left out)."""
    found = []
    for i, meta in enumerate(batch.meta):
        keep = batch.valid[i]
        if keep.any():
            found.append(
                detect(
                    meta["image_id"],
                    batch.boxes[i][keep],
                    logits[i][keep],
                    batch.scores[i][keep],
                    topk,
                    meta.get("masks"),
                )
            )
    return found
