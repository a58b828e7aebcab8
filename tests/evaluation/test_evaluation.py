"""Evaluation: the scoring rule, LVIS/COCO AP through the libraries, input errors, the CLI."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from regionspot_pl.data.annotations import AnnotationError, read_ground_truth
from regionspot_pl.evaluate import main
from regionspot_pl.evaluation import (
    COCO_METRICS,
    LVIS_METRICS,
    GroundTruthError,
    ResultsError,
    detections_to_results,
    evaluate_detections,
    format_metrics_table,
    score_regions,
)
from regionspot_pl.evaluation.backends import _numpy_float_alias
from regionspot_pl.evaluation.metrics import BACKENDS

# ---------------------------------------------------------------------------------------------
# A tiny hand-made LVIS-style set: 3 images of 200x200, one category per frequency split, with
# small (< 32^2), medium and large boxes. Category ids are not contiguous on purpose.
# ---------------------------------------------------------------------------------------------

H = W = 200
RARE, COMMON, FREQUENT = 1, 5, 9
CATEGORY_IDS = [RARE, COMMON, FREQUENT]  # contiguous class index -> dataset id
GT_BOXES = {  # image id -> [(category id, [x, y, w, h])]
    10: [(RARE, [10, 10, 20, 20]), (FREQUENT, [60, 60, 120, 120])],
    20: [(COMMON, [20, 20, 50, 50]), (FREQUENT, [150, 150, 20, 20])],
    30: [(RARE, [100, 20, 50, 50]), (COMMON, [10, 70, 120, 120]), (FREQUENT, [140, 140, 50, 50])],
}


def box_rle(box: list[float]) -> dict:
    """Compressed RLE (str counts) of the rectangle mask of an integer [x, y, w, h] box."""
    x, y, w, h = (int(v) for v in box)
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def make_lvis_gt() -> dict:
    images, annotations = [], []
    for img_id, objs in GT_BOXES.items():
        present = {cat for cat, _ in objs}
        images.append(
            {
                "id": img_id,
                "width": W,
                "height": H,
                # Every object is annotated, so every absent category is a verified negative.
                "neg_category_ids": [c for c in CATEGORY_IDS if c not in present],
                "not_exhaustive_category_ids": [],
            }
        )
        for cat, box in objs:
            rle = box_rle(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img_id,
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "area": float(mask_utils.area(rle)),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": RARE, "name": "ant", "frequency": "r"},
        {"id": COMMON, "name": "bus", "frequency": "c"},
        {"id": FREQUENT, "name": "cat", "frequency": "f"},
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco_gt() -> dict:
    gt = make_lvis_gt()
    for cat in gt["categories"]:
        del cat["frequency"]
    return gt


def perfect_results(gt: dict, score: float = 0.9, segm: bool = False) -> list[dict]:
    results = []
    for ann in gt["annotations"]:
        det = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "bbox": list(ann["bbox"]),
            "score": score,
        }
        if segm:
            det["segmentation"] = dict(ann["segmentation"])
        results.append(det)
    return results


def noisy_results(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered boxes, random scores, every class on every box: a non-trivial AP."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        for cat in CATEGORY_IDS:
            x, y, w, h = ann["bbox"]
            dx, dy = rng.uniform(-0.2, 0.2, size=2) * (w, h)
            box = [x + dx, y + dy, w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            results.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "score": float(rng.uniform()),
                }
            )
    return results


# ---------------------------------------------------------------------------------------------
# LVIS AP
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detector_scores_one(iou_type: str) -> None:
    gt = make_lvis_gt()
    metrics = evaluate_detections(gt, perfect_results(gt, segm=iou_type == "segm"), iou_type)
    assert list(metrics) == list(LVIS_METRICS)
    assert all(v == pytest.approx(1.0) for v in metrics.values()), metrics


def test_swapping_rare_and_common_lowers_only_their_splits() -> None:
    gt = make_lvis_gt()
    results = perfect_results(gt)
    swap = {RARE: COMMON, COMMON: RARE}
    for det in results:
        det["category_id"] = swap.get(det["category_id"], det["category_id"])
    metrics = evaluate_detections(gt, results)
    # Each swapped detection is a false positive (its class is present elsewhere in the image or
    # a verified negative), and no rare/common object is found: those APs drop to 0.
    assert metrics["APr"] == pytest.approx(0.0)
    assert metrics["APc"] == pytest.approx(0.0)
    assert metrics["APf"] == pytest.approx(1.0)
    assert metrics["AP"] == pytest.approx(1.0 / 3.0)


def test_lvis_keeps_at_most_max_dets_per_image() -> None:
    gt = make_lvis_gt()
    results = perfect_results(gt, score=0.5)
    # 300 confident false positives on image 10 push its two true detections past the cap.
    results += [
        {"image_id": 10, "category_id": FREQUENT, "bbox": [0.0, 0.0, 5.0 + i / 100, 5.0], "score": 0.9}
        for i in range(300)
    ]
    capped = evaluate_detections(gt, results)  # max_dets=300, the official LVIS value
    uncapped = evaluate_detections(gt, results, max_dets=302)
    # Capped: the rare class finds 1 of its 2 objects without a false positive, so precision is
    # 1 at the 51 recall thresholds 0.00..0.50 out of 101 and 0 beyond.
    assert capped["APr"] == pytest.approx(51 / 101)
    assert uncapped["APr"] == pytest.approx(1.0)
    assert capped["AP"] < uncapped["AP"]


def test_numpy_float_alias_is_scoped() -> None:
    assert "float" not in vars(np)  # NumPy >= 1.24, as pinned
    gt = make_lvis_gt()
    evaluate_detections(gt, perfect_results(gt), backend="lvis")
    assert not hasattr(np, "float"), "the lvis workaround leaked np.float"
    with pytest.raises(RuntimeError), _numpy_float_alias():
        assert np.float is float  # type: ignore[attr-defined]
        raise RuntimeError("boom")
    assert not hasattr(np, "float")


def test_inputs_are_not_modified_and_output_is_quiet(capsys: pytest.CaptureFixture) -> None:
    gt, results = make_lvis_gt(), noisy_results(make_lvis_gt())
    for det in results:
        det["segmentation"] = box_rle([round(v) for v in det["bbox"]])
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    for iou_type, backend in itertools.product(("bbox", "segm"), BACKENDS):
        evaluate_detections(gt, results, iou_type, backend=backend)
        evaluate_detections(gt, results, iou_type, kind="coco", backend=backend)
    assert gt == gt_before and results == results_before
    assert capsys.readouterr().out == ""
    evaluate_detections(gt, results, verbose=True)
    assert "APr = " in capsys.readouterr().out  # hotcoco's summary
    evaluate_detections(gt, results, verbose=True, backend="lvis")
    assert "Average Precision" in capsys.readouterr().out  # the LVIS API's


def test_metric_without_ground_truth_is_nan() -> None:
    gt = make_lvis_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != RARE]
    for img in gt["images"]:
        img["neg_category_ids"] = [c for c in img["neg_category_ids"] if c != RARE]
    metrics = evaluate_detections(gt, perfect_results(gt))
    assert math.isnan(metrics["APr"])
    assert metrics["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# COCO AP: the same numbers as pycocotools used directly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_kind_matches_cocoeval(iou_type: str, backend: str) -> None:
    gt = make_coco_gt()
    results = noisy_results(gt)
    if iou_type == "segm":
        for det in results:
            det["segmentation"] = box_rle([round(v) for v in det["bbox"]])
            del det["bbox"]

    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    coco_gt.createIndex()
    reference = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType=iou_type)
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    expected = {k: float(reference.stats[i]) for i, k in enumerate(COCO_METRICS)}
    assert 0.0 < expected["AP"] < 1.0  # a non-trivial case

    auto = evaluate_detections(gt, results, iou_type, backend=backend)  # no 'frequency': COCO
    official = evaluate_detections(gt, results, iou_type, max_dets=100, backend=backend)
    forced = evaluate_detections(make_lvis_gt(), results, iou_type, kind="coco", max_dets=100, backend=backend)
    for metrics in (auto, official, forced):
        assert list(metrics) == list(COCO_METRICS)  # APr/APc/APf are absent for COCO
        assert metrics == pytest.approx(expected, abs=1e-12)
    # A cap other than 100 still yields an AP (COCOeval.summarize alone would give -1 there).
    capped = evaluate_detections(gt, results, iou_type, max_dets=1, backend=backend)
    assert 0.0 < capped["AP"] < 1.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_image_id() -> None:
    gt = make_lvis_gt()
    results = (
        perfect_results(gt) + [{"image_id": 999, "category_id": RARE, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.1}] * 2
    )
    with pytest.raises(ResultsError, match=r"2 of 9 results refer to 1 image ids .*\[999\]"):
        evaluate_detections(gt, results)


def test_unknown_category_id() -> None:
    gt = make_lvis_gt()
    results = perfect_results(gt)
    results[0]["category_id"] = 0  # a contiguous class index instead of the dataset id
    results[1]["category_id"] = 2
    with pytest.raises(ResultsError, match=r"2 category ids .*\[0, 2\].*not a contiguous"):
        evaluate_detections(gt, results)


@pytest.mark.parametrize("bbox", [[10.0, 10.0, -5.0, 20.0], [10.0, 10.0, 5.0, 0.0]])
def test_non_positive_box_size(bbox: list[float]) -> None:
    gt = make_lvis_gt()
    results = perfect_results(gt)
    results[3]["bbox"] = bbox
    with pytest.raises(ResultsError, match=r"1 of 7 results have an invalid 'bbox' \(indices \[3\]"):
        evaluate_detections(gt, results)


def test_empty_results(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("[]")
    for results in ([], path, str(path)):
        with pytest.raises(ResultsError, match="results are empty"):
            evaluate_detections(make_lvis_gt(), results)


def test_missing_keys_and_segm_without_masks() -> None:
    gt = make_lvis_gt()
    results = perfect_results(gt)
    del results[2]["score"]
    with pytest.raises(ResultsError, match=r"1 lack 'score' \(indices \[2\]\)"):
        evaluate_detections(gt, results)
    with pytest.raises(ResultsError, match=r"7 lack 'segmentation'.*compressed RLE"):
        evaluate_detections(gt, perfect_results(gt), iou_type="segm")


def test_bad_ground_truth(tmp_path: Path) -> None:
    results = perfect_results(make_lvis_gt())
    with pytest.raises(GroundTruthError, match="ground truth file not found"):
        evaluate_detections(tmp_path / "missing.json", results)
    with pytest.raises(GroundTruthError, match="'frequency'.*kind='coco'"):
        evaluate_detections(make_coco_gt(), results, kind="lvis")
    gt = make_lvis_gt()
    del gt["images"][0]["neg_category_ids"]
    with pytest.raises(GroundTruthError, match=r"neg_category_ids.*ids \[10\]"):
        evaluate_detections(gt, results)
    with pytest.raises(ResultsError, match="must be a JSON list"):
        evaluate_detections(make_lvis_gt(), {"bbox": {"AP": 1.0}})  # type: ignore[arg-type]


def test_the_ground_truth_goes_through_the_one_annotation_reader(tmp_path: Path) -> None:
    """The evaluators read the ground truth with data.annotations.read_ground_truth: a malformed
    record is refused as extraction refuses it (naming it), a GroundTruthError that is also an
    AnnotationError; NumPy scalars of an in-memory file score as the plain numbers do."""
    gt = make_lvis_gt()
    gt["annotations"][1]["bbox"] = [1.0, 2.0, 3.0]
    path = write_json(tmp_path / "gt.json", gt)
    with pytest.raises(GroundTruthError, match=r"gt.json: annotation #1 \(id 2\) .* has 3 numbers, not 4") as err:
        evaluate_detections(path, perfect_results(make_lvis_gt()))
    assert isinstance(err.value, AnnotationError)
    with pytest.raises(AnnotationError, match=r"gt.json: annotation #1 \(id 2\) .* has 3 numbers, not 4"):
        read_ground_truth(path)
    plain = make_lvis_gt()
    numpy_ids = make_lvis_gt()
    for ann in numpy_ids["annotations"]:
        ann.update(id=np.int64(ann["id"]), image_id=np.int64(ann["image_id"]), bbox=np.asarray(ann["bbox"]).tolist())
        ann["category_id"] = np.int32(ann["category_id"])
    results = noisy_results(plain)
    assert evaluate_detections(numpy_ids, results) == evaluate_detections(plain, results)


# ---------------------------------------------------------------------------------------------
# Scoring rule
# ---------------------------------------------------------------------------------------------


def test_score_regions_softmax_by_hand() -> None:
    # softmax rows: [1, 3] / 4 = [0.25, 0.75] and [2, 2] / 4 = [0.5, 0.5]
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]])
    box_idx, class_idx, scores = score_regions(logits)
    assert box_idx.tolist() == [0, 1, 1, 0]
    assert class_idx.tolist() == [1, 0, 1, 0]  # the tie (box 1) keeps class order
    assert scores.tolist() == pytest.approx([0.75, 0.5, 0.5, 0.25])
    # GT boxes: proposal scores of one change nothing.
    assert score_regions(logits, torch.ones(2))[2].tolist() == pytest.approx(scores.tolist())


def test_score_regions_proposal_score_multiplies() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]])
    box_idx, class_idx, scores = score_regions(logits, torch.tensor([0.5, 1.0]), topk=3)
    # [[0.125, 0.375], [0.5, 0.5]] -> the best three pairs
    assert list(zip(box_idx.tolist(), class_idx.tolist())) == [(1, 0), (1, 1), (0, 1)]
    assert scores.tolist() == pytest.approx([0.5, 0.5, 0.375])


def test_score_regions_keeps_at_most_300() -> None:
    logits = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    for topk, expected in [(1000, 300), (300, 300), (10, 10)]:
        box_idx, class_idx, scores = score_regions(logits, topk=topk)
        assert box_idx.shape == class_idx.shape == scores.shape == (expected,)
        assert torch.all(scores[:-1] >= scores[1:])
    assert score_regions(logits[:4])[0].numel() == 4 * 5  # fewer pairs than the cap
    probs = logits.softmax(-1)
    box_idx, class_idx, scores = score_regions(logits)
    assert torch.allclose(probs[box_idx, class_idx], scores)
    assert scores[-1] >= probs.flatten().sort(descending=True).values[299]


def test_score_regions_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        score_regions(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"proposal_scores must be \[N\] = \[3\]"):
        score_regions(torch.zeros(3, 4), torch.ones(4))


def test_detections_to_results_format() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0]])
    masks = [mask_utils.encode(np.asfortranarray(np.ones((H, W), np.uint8))) for _ in range(2)]
    dets = detections_to_results(
        7,
        boxes,
        torch.tensor([0, 1]),
        torch.tensor([2, 0]),
        torch.tensor([0.9, 0.4]),
        CATEGORY_IDS,
        masks_rle=masks,
    )
    # mask results carry no bbox (as the reference writes them): LVIS takes areas from the masks
    assert dets[0] == {
        "image_id": 7,
        "category_id": FREQUENT,
        "score": pytest.approx(0.9),
        "segmentation": dets[0]["segmentation"],
    }
    assert isinstance(dets[0]["segmentation"]["counts"], str)
    dets = detections_to_results(
        7, boxes, torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([0.9, 0.4]), CATEGORY_IDS
    )
    assert dets[0] == {
        "image_id": 7,
        "category_id": FREQUENT,
        "bbox": [10.0, 20.0, 20.0, 40.0],
        "score": pytest.approx(0.9),
    }
    assert dets[1]["category_id"] == RARE and dets[1]["bbox"] == [0.0, 0.0, 5.0, 5.0]
    json.dumps(dets)  # plain JSON types only
    with pytest.raises(ValueError, match="category_ids maps only 3 classes"):
        detections_to_results(7, boxes, torch.tensor([0]), torch.tensor([3]), torch.ones(1), CATEGORY_IDS)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_scoring_pipeline_on_gt_boxes(iou_type: str) -> None:
    """GT boxes with logits favouring the true class -> results -> AP 1 (all pairs are kept)."""
    gt = make_lvis_gt()
    results = []
    for img_id, objs in GT_BOXES.items():
        xywh = torch.tensor([box for _, box in objs], dtype=torch.float64)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        logits = torch.zeros(len(objs), len(CATEGORY_IDS))
        for n, (cat, _) in enumerate(objs):
            logits[n, CATEGORY_IDS.index(cat)] = 5.0
        masks = [box_rle(box) for _, box in objs] if iou_type == "segm" else None
        results += detections_to_results(img_id, boxes, *score_regions(logits), CATEGORY_IDS, masks)
    assert len(results) == 7 * 3
    metrics = evaluate_detections(gt, results, iou_type)
    assert all(v == pytest.approx(1.0) for v in metrics.values()), metrics


# ---------------------------------------------------------------------------------------------
# Table and CLI
# ---------------------------------------------------------------------------------------------


def test_format_metrics_table() -> None:
    table = format_metrics_table({"bbox": {"AP": 0.5304, "APr": math.nan}, "segm": dict.fromkeys(LVIS_METRICS, 0.25)})
    header, bbox, segm = table.splitlines()
    assert header.split() == list(LVIS_METRICS)
    assert bbox.split() == ["bbox", "53.0"] + ["-"] * 8
    assert segm.split() == ["segm"] + ["25.0"] * 9


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_cli_writes_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = make_lvis_gt()
    gt_path = write_json(tmp_path / "gt.json", gt)
    res_path = write_json(tmp_path / "res.json", perfect_results(gt, segm=True))
    out = tmp_path / "sub"
    rc = main([str(gt_path), str(res_path), "--iou_type", "[bbox,segm]", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[1].split() == ["bbox"] + ["100.0"] * 9
    assert f"report: {out / 'report.md'}" in stdout
    written = json.loads((out / "metrics.json").read_text())
    assert list(written) == ["bbox", "segm"]
    for metrics in written.values():
        assert list(metrics) == list(LVIS_METRICS)
        assert all(v == pytest.approx(1.0) for v in metrics.values())
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "ap_per_class.png", "ap_per_class.csv"}

    # COCO-style GT: six metrics; a metric with nothing to score is written as null.
    coco = make_coco_gt()
    coco["annotations"] = [a for a in coco["annotations"] if a["area"] > 32**2]
    coco_path = write_json(tmp_path / "coco.json", coco)
    coco_res = write_json(tmp_path / "coco_res.json", perfect_results(coco))
    for backend in BACKENDS:
        assert main([str(coco_path), str(coco_res), "--out", str(out), "--metric_backend", backend]) == 0
        written = json.loads((out / "metrics.json").read_text())
        assert list(written) == ["bbox"] and list(written["bbox"]) == list(COCO_METRICS)
        assert written["bbox"]["APs"] is None and written["bbox"]["AP"] == pytest.approx(1.0)


def test_cli_out_is_a_folder_and_backend_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = make_lvis_gt()
    gt_path = write_json(tmp_path / "gt.json", gt)
    res_path = write_json(tmp_path / "res.json", perfect_results(gt))
    assert main([str(gt_path), str(res_path), "--out", str(tmp_path / "metrics.json")]) == 2
    assert "--out is an output folder" in capsys.readouterr().err
    assert main([str(gt_path), str(res_path), "--metric_backend", "pycocotools"]) == 2
    assert "--metric_backend must be one of hotcoco, lvis, got pycocotools" in capsys.readouterr().err


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt_path = write_json(tmp_path / "gt.json", make_lvis_gt())
    empty = write_json(tmp_path / "empty.json", [])
    assert main([str(gt_path), str(empty)]) == 2
    assert "error: results are empty" in capsys.readouterr().err

    proc = subprocess.run(
        [sys.executable, "-m", "regionspot_pl.evaluate", str(gt_path), str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "error: results file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
