"""``--scoring tap``: TAP's multi-label rule against the rule written out by hand, the default rule
unchanged, and both rules through ``test`` and ``evaluate`` (a saved logits file) end to end.

The hand-written rule (:func:`tap_reference`) follows tokenize-anything's ``scripts/eval_cls.py``
(``Predictor.get_results``, ``filter_outputs``) as that code computes: its probabilities [K, 1]
times the clipped IoUs of the pairs' boxes [K] broadcast to [K, K]; NMS ranks by column 0 (the
IoU of the image's first pair's box), the written score is the last column (its last pair's box).
Plain Python and NumPy float32 scalars, loops and a hand NMS; the only shared input is the
softmax of the logits, which TAP's script also takes as given (its concept projector's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regionspot_pl import evaluate as evaluate_cli
from regionspot_pl import test as test_cli
from regionspot_pl.cache.shards import iter_samples, list_shards
from regionspot_pl.evaluation.saved_logits import ImageLogits, read_logits
from regionspot_pl.evaluation.scoring import (
    ImageDetections,
    detect,
    detections_to_results,
    image_detections,
    score_regions,
    score_regions_tap,
)


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes, in Python floats."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def _clip01(value: np.float32) -> np.float32:
    return np.float32(min(max(float(value), 0.0), 1.0))


def tap_reference(probs: np.ndarray, boxes: np.ndarray, iou: np.ndarray, max_dets: int = 300) -> list[tuple]:
    """TAP's rule on one image: [(box, class, score)] in the order its script writes them."""
    pairs = [(n, c) for n in range(probs.shape[0]) for c in range(probs.shape[1]) if float(probs[n, c]) > 0.001]
    if not pairs:
        return []
    first, last = pairs[0][0], pairs[-1][0]
    rank = [np.sqrt(np.float32(probs[n, c]) * _clip01(iou[first])) for n, c in pairs]
    score = [np.sqrt(np.float32(probs[n, c]) * _clip01(iou[last])) for n, c in pairs]
    kept = []
    for cls in sorted({c for _, c in pairs}):
        waiting = sorted((k for k, (_, c) in enumerate(pairs) if c == cls), key=lambda k: -rank[k])  # stable
        while waiting:
            best = waiting.pop(0)
            kept.append(best)
            waiting = [k for k in waiting if _box_iou(boxes[pairs[best][0]], boxes[pairs[k][0]]) <= 0.5]
    if len(kept) > max_dets:
        cut = sorted((score[k] for k in kept), reverse=True)[max_dets - 1]
        kept = [k for k in kept if score[k] >= cut]
    return [(pairs[k][0], pairs[k][1], float(score[k])) for k in kept]


def _ours(logits: torch.Tensor, boxes: np.ndarray, iou: np.ndarray, topk: int = 300) -> list[tuple]:
    box_idx, class_idx, scores = score_regions_tap(logits, torch.from_numpy(boxes), torch.from_numpy(iou), topk)
    assert scores.dtype == torch.float32
    return list(zip(box_idx.tolist(), class_idx.tolist(), scores.tolist()))


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (each row's last entry takes what the others leave)."""
    rows = np.array(probs, np.float64)
    rows[:, -1] = 1 - rows[:, :-1].sum(axis=1)
    assert (rows > 0).all()
    return torch.from_numpy(np.log(rows)).float()


# Boxes over box 0 = [0, 0, 10, 10]: box 1 overlaps it by 0.83, box 2 by 0.53, box 3 by 0.48,
# box 4 by exactly 0.5 (kept: NMS drops overlaps above the threshold), box 5 not at all.
NMS_BOXES = np.array(
    [[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 19], [0, 0, 10, 21], [0, 0, 20, 10], [50, 50, 60, 60]], np.float32
)
# class 0 ranks the boxes in another order than their index; class 1 sits around 0.001
NMS_PROBS = [
    [0.30, 0.00101, 0.20, 0.0005, 0],
    [0.40, 0.00099, 0.10, 0.002, 0],
    [0.20, 0.0010001, 0.25, 0.0009, 0],
    [0.25, 0.0011, 0.05, 0.3, 0],
    [0.35, 0.0010002, 0.30, 0.01, 0],
    [0.50, 0.0009999, 0.10, 0.2, 0],
]


def _grid_image(rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """40 disjoint boxes sharing one row of logits over 20 classes: 800 pairs whose scores tie in
    groups of 40, so the 300th-best falls inside a tie (positions 281-320)."""
    boxes = np.array([[20 * (k % 8), 20 * (k // 8), 20 * (k % 8) + 10, 20 * (k // 8) + 10] for k in range(40)])
    logits = torch.linspace(0, 3, 20).repeat(40, 1)
    iou = rng.uniform(-0.5, 1.5, 40).astype(np.float32)
    iou[0], iou[-1] = 1.7, 0.64  # the first and last pair's boxes: one above 1, clipped
    return logits, boxes.astype(np.float32), iou


def test_tap_rule_keeps_ties_at_the_300th_score():
    logits, boxes, iou = _grid_image(np.random.default_rng(0))
    probs = logits.softmax(-1).numpy()
    expected = tap_reference(probs, boxes, iou)
    assert len(expected) == 320  # 300 and the 20 pairs tied with the 300th
    assert _ours(logits, boxes, iou) == expected
    # every pair scores with the last pair's box IoU (0.64), not its own
    p = np.float32(probs[5, 19])
    assert (5, 19, float(np.sqrt(p * np.float32(0.64)))) in expected
    # a smaller cut keeps its ties too: 100 falls inside the third group (81-120)
    assert _ours(logits, boxes, iou, topk=100) == tap_reference(probs, boxes, iou, max_dets=100)
    assert len(tap_reference(probs, boxes, iou, max_dets=100)) == 120


@pytest.mark.parametrize(
    ("iou", "class0_kept"),
    [
        # ranked by probability (first pair's box IoU 0.81): box 5; box 1, which drops 0, 2 and 3
        # (0.83, 0.63, 0.57); box 4 (0.45 with box 1)
        ([0.81, -0.2, 0.4, 1.1, 0.05, 1.3], [5, 1, 4]),
        # first pair's box IoU below 0, clipped to 0: every rank 0, so NMS goes by box index: box 0
        # drops 1 and 2, keeps 3 (0.48) and 4 (exactly 0.5)
        ([-0.3, 0.9, 0.4, 1.1, 0.05, 0.5], [0, 3, 4, 5]),
    ],
    ids=["ranked", "all ranks tied"],
)
def test_tap_rule_nms_and_probability_threshold(iou, class0_kept):
    logits = _logits_for(NMS_PROBS)
    probs = logits.softmax(-1).numpy()
    near = probs[:, 1]
    assert ((near > 0.001) & (near < 0.0010003)).sum() == 2 and ((near < 0.001) & (near > 0.0009997)).sum() == 1
    iou = np.array(iou, np.float32)
    expected = tap_reference(probs, NMS_BOXES, iou)
    assert _ours(logits, NMS_BOXES, iou) == expected
    assert [b for b, c, _ in expected if c == 0] == class0_kept  # worked out by hand above
    assert {b for b, c, _ in expected if c == 1} <= {0, 2, 3, 4}  # only the pairs above 0.001


def test_tap_rule_without_a_pair_above_the_threshold_gives_nothing():
    """1,200 classes alike: every probability is 1/1200 < 0.001 (TAP's script writes nothing)."""
    logits = torch.zeros(3, 1200)
    boxes = np.array([[0, 0, 5, 5], [1, 1, 6, 6], [9, 9, 19, 19]], np.float32)
    assert (
        _ours(logits, boxes, np.ones(3, np.float32)) == [] == tap_reference(logits.softmax(-1).numpy(), boxes, [1] * 3)
    )


def test_default_scoring_is_the_reference_rule_unchanged():
    """detect without a scoring is score_regions, bit for bit, whatever the IoUs."""
    torch.manual_seed(0)
    logits, boxes = torch.randn(30, 50) * 4, torch.rand(30, 4) * 100
    box_scores, iou = torch.rand(30), torch.rand(30) * 2 - 0.5
    expected = score_regions(logits, box_scores, 300)
    for found in (detect(1, boxes, logits, box_scores), detect(1, boxes, logits, box_scores, predicted_iou=iou)):
        for a, b in zip((found.box_idx, found.class_idx, found.scores), expected):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# test and evaluate, end to end on the demo val shards
# ---------------------------------------------------------------------------------------------


def _test(demo_data, demo_shards, tiny_head, out: Path, *extra: str) -> None:
    flags = {"--shards": demo_shards["val"], "--annotations": demo_data["val_json"], "--head": tiny_head["file"],
             "--out": out, "--device": "cpu", "--text_cache": demo_shards["text_cache"]}  # fmt: skip
    assert test_cli.main([str(w) for pair in flags.items() for w in pair] + list(extra)) == 0


def _results(found: ImageDetections, category_ids: list[int]) -> list[dict]:
    return detections_to_results(
        found.image_id, found.boxes, found.box_idx, found.class_idx, found.scores, category_ids
    )


@pytest.fixture(scope="module")
def runs(demo_data, demo_shards, tiny_head, tmp_path_factory) -> dict[str, Path]:
    """The demo val split tested with each rule, logits kept."""
    root = tmp_path_factory.mktemp("scoring")
    for rule in ("regionspot", "tap"):
        _test(demo_data, demo_shards, tiny_head, root / rule, "--scoring", rule, "--save_logits", "true")
    _test(demo_data, demo_shards, tiny_head, root / "default")
    return {"regionspot": root / "regionspot", "tap": root / "tap", "default": root / "default"}


def test_logits_file_holds_what_the_shards_and_the_head_gave(runs, demo_shards):
    saved = read_logits(runs["tap"] / "logits.npz")
    samples = list(iter_samples(list_shards(demo_shards["val"])))
    assert [it.image_id for it in saved.images] == [s["meta"]["image_id"] for s in samples]
    for item, s in zip(saved.images, samples):
        np.testing.assert_array_equal(item.iou, s["iou"])
        np.testing.assert_array_equal(item.boxes, s["boxes"])
        assert item.masks == s["meta"]["masks"] and item.logits.shape == (len(s["boxes"]), 40)
    other = read_logits(runs["regionspot"] / "logits.npz")
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(saved.images, other.images))


def test_test_scoring_tap_writes_taps_detections(runs):
    saved = read_logits(runs["tap"] / "logits.npz")
    written = json.loads((runs["tap"] / "detections_bbox.json").read_text())
    expected = []
    for item in saved.images:
        probs = item.logits.softmax(-1).numpy()
        for b, c, score in tap_reference(probs, item.boxes, item.iou):
            x1, y1, x2, y2 = (float(v) for v in item.boxes[b])
            bbox = [x1, y1, x2 - x1, y2 - y1]
            expected.append(
                {"image_id": item.image_id, "category_id": saved.category_ids[c], "bbox": bbox, "score": score}
            )
    assert written == expected and len(expected) > 100
    metrics = json.loads((runs["tap"] / "metrics.json").read_text())
    assert metrics["scoring"] == "tap" and metrics["bbox"]["AP"] is not None
    assert "| scoring | `tap (TAP's multi-label rule" in (runs["tap"] / "report.md").read_text()


def test_default_test_run_is_the_reference_rule(runs):
    """No --scoring: the same files as --scoring regionspot, and score_regions' detections."""
    for name in ("detections_bbox.json", "detections_segm.json"):
        assert (runs["default"] / name).read_bytes() == (runs["regionspot"] / name).read_bytes()
    saved = read_logits(runs["regionspot"] / "logits.npz")
    written = json.loads((runs["default"] / "detections_bbox.json").read_text())
    expected = []
    for item in saved.images:
        box_idx, class_idx, scores = score_regions(item.logits, torch.from_numpy(item.scores))
        found = ImageDetections(item.image_id, torch.from_numpy(item.boxes), box_idx, class_idx, scores, None)
        expected += _results(found, saved.category_ids)
    assert written == expected
    assert json.loads((runs["default"] / "metrics.json").read_text())["scoring"] == "regionspot"


@pytest.mark.parametrize("rule", ["tap", "regionspot", None])
def test_evaluate_scores_a_logits_file_as_test_did(runs, demo_data, rule, tmp_path, capsys):
    run = runs[rule or "regionspot"]
    capsys.readouterr()
    argv = [str(demo_data["val_json"]), str(run / "logits.npz"), "--iou_type", "[bbox,segm]", "--out", str(tmp_path)]
    assert evaluate_cli.main(argv + (["--scoring", rule] if rule else [])) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith(f"scoring: {rule or 'regionspot'} (")
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((run / "metrics.json").read_text())
    assert f"| scoring | `{rule or 'regionspot'} (" in (tmp_path / "report.md").read_text()


def test_detect_checks_its_scoring_and_image_detections_passes_the_iou():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    boxes = np.array([[0, 0, 4, 4], [10, 10, 14, 14]], np.float32)
    with pytest.raises(ValueError, match="predicted IoU"):
        detect(1, torch.from_numpy(boxes), logits, torch.ones(2), scoring="tap")
    with pytest.raises(ValueError, match="unknown scoring 'best'"):
        detect(1, torch.from_numpy(boxes), logits, torch.ones(2), scoring="best")  # type: ignore[arg-type]
    item = ImageLogits(1, boxes, np.ones(2, np.float32), np.array([0.5, 2.0], np.float32), logits, None)
    found = image_detections(item, "tap")
    assert list(zip(found.box_idx.tolist(), found.class_idx.tolist())) == [(0, 0), (1, 0), (1, 1), (0, 1)]
    expected = tap_reference(logits.softmax(-1).numpy(), boxes, item.iou)
    assert found.scores.tolist() == [score for _, _, score in expected]
