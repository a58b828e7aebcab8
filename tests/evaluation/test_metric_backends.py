"""hotcoco against the LVIS API: the same AP, split APs and per-class APs on varied LVIS-style sets.

Each set is generated here from a seed: non-contiguous image and category ids, objects of every
size bucket with polygon masks (as LVIS ground truth stores them), images without any object,
images with only verified negatives, not-exhaustive classes, a class with no detection, a rare
class absent from the split, detections on classes the image says nothing about (LVIS ignores
them), score ties, and more detections per image than the cap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from regionspot_pl.evaluation.metrics import (
    BACKENDS,
    LVIS_METRICS,
    evaluate_detections,
    evaluate_results,
)

H, W = 200, 240
FREQS = "rrrcccccffffff"  # 14 categories
CAT_IDS = [3 * i + 2 for i in range(len(FREQS))]  # 2, 5, 8, ...: not contiguous
ABSENT_RARE = CAT_IDS[0]  # a rare class with no object, in no image's lists, no detection
UNDETECTED = CAT_IDS[5]  # a common class with objects but no detection anywhere


def polygon(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """A random convex-ish polygon (6 vertices) inside an [x, y, w, h] box."""
    x, y, w, h = box
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=6))
    radius = rng.uniform(0.6, 1.0, size=6)
    xs = x + w / 2 * (1 + radius * np.cos(angles))
    ys = y + h / 2 * (1 + radius * np.sin(angles))
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def rle_of(poly: list[float]) -> dict:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def random_box(rng: np.random.Generator, bucket: str) -> np.ndarray:
    """[x, y, w, h] whose polygon's area is mostly in the bucket (small < 32^2 <= medium < 96^2
    <= large; the polygon covers 40-90% of its box)."""
    side = {"small": (4, 24), "medium": (40, 80), "large": (140, 190)}[bucket]
    w, h = rng.uniform(*side, size=2)
    w, h = min(w, W - 1), min(h, H - 1)
    return np.array([rng.uniform(0, W - w), rng.uniform(0, H - h), w, h])


def make_set(seed: int, num_images: int = 40) -> tuple[dict, list[dict]]:
    """(LVIS-style GT, results with 'bbox', 'score' and an RLE 'segmentation' each)."""
    rng = np.random.default_rng(seed)
    present = [c for c in CAT_IDS if c != ABSENT_RARE]
    images, annotations, results = [], [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i
        role = ("empty", "negatives only", "normal", "normal")[i % 4]
        pos = [] if role != "normal" else list(rng.choice(present, size=rng.integers(1, 4), replace=False))
        others = [c for c in present if c not in pos]
        neg = [] if role == "empty" else list(rng.choice(others, size=3, replace=False))
        not_exhaustive = [c for c in pos if rng.random() < 0.3]
        images.append(
            {
                "id": image_id,
                "width": W,
                "height": H,
                "neg_category_ids": [int(c) for c in neg],
                "not_exhaustive_category_ids": [int(c) for c in not_exhaustive],
            }
        )
        objects = []
        for cat in pos:
            for _ in range(rng.integers(1, 4)):
                box = random_box(rng, rng.choice(["small", "medium", "large"]))
                poly = polygon(rng, box)
                x0, y0 = min(poly[0::2]), min(poly[1::2])
                tight = [x0, y0, max(poly[0::2]) - x0, max(poly[1::2]) - y0]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(cat),
                        "bbox": tight,
                        "area": float(mask_utils.area(rle_of(poly))),
                        "segmentation": [poly],
                    }
                )
                objects.append((cat, np.array(tight), np.array(poly)))
        results += detections(rng, image_id, objects, pos, neg)
    categories = [{"id": c, "name": f"class_{c}", "frequency": f} for c, f in zip(CAT_IDS, FREQS)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def detections(rng: np.random.Generator, image_id: int, objects: list, pos: list, neg: list) -> list[dict]:
    """Shifted hits (box and mask), mislabelled hits, and false positives on the image's
    positive, negative and unrelated classes; ``objects`` holds (category, box, polygon)."""
    allowed = [c for c in CAT_IDS if c not in (ABSENT_RARE, UNDETECTED)]
    out = []
    for cat, box, poly in objects:
        for _ in range(rng.integers(0, 3)):
            label = cat if rng.random() < 0.7 else rng.choice(allowed)
            if label == UNDETECTED:
                continue
            shift = rng.normal(0, 0.08, size=2) * box[2:]  # the object's mask and box, moved
            out.append((int(label), box + [*shift, 0, 0], (poly.reshape(-1, 2) + shift).ravel()))
    for _ in range(rng.integers(0, 12)):
        label = rng.choice(list(pos) + list(neg) + allowed) if rng.random() < 0.8 else rng.choice(allowed)
        if label != UNDETECTED:
            box = random_box(rng, rng.choice(["small", "medium", "large"]))
            out.append((int(label), box, np.array(polygon(rng, box))))
    dets = []
    for label, box, poly in out:
        x, y = np.clip(box[:2], 0, [W - 2, H - 2])
        w, h = np.clip(box[2:], 1, [W - x, H - y])
        poly = np.clip(poly.reshape(-1, 2), 0, [W, H]).ravel().round(2).tolist()
        score = float(rng.choice([0.5, 0.25])) if rng.random() < 0.2 else float(rng.uniform())  # ties
        dets.append(
            {
                "image_id": image_id,
                "category_id": label,
                "bbox": [float(x), float(y), float(w), float(h)],
                "score": score,
                "segmentation": rle_of(poly),
            }
        )
    return dets


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert list(a) == list(b) == list(LVIS_METRICS)
    for key in LVIS_METRICS:
        if math.isnan(a[key]) or math.isnan(b[key]):
            assert math.isnan(a[key]) and math.isnan(b[key]), (key, a[key], b[key])
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, a, b)


def both(gt: dict, results: list[dict], iou_type: str, **kw) -> tuple:
    return tuple(evaluate_results(gt, results, iou_type, backend=b, **kw) for b in BACKENDS)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["bbox", "segm", "segm without bbox"])
def test_backends_agree(seed: int, variant: str) -> None:
    gt, results = make_set(seed)
    iou_type = variant.split()[0]
    if iou_type == "bbox":
        results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    if variant == "segm without bbox":  # as test writes masks: LVIS then takes areas from them
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    fast, reference = both(gt, results, iou_type)
    assert (fast.backend, reference.backend) == ("hotcoco", "lvis")
    assert_same(fast.metrics, reference.metrics)
    assert 0.05 < reference.metrics["AP"] < 0.95  # a non-trivial set
    assert not any(math.isnan(reference.metrics[k]) for k in ("APs", "APm", "APl", "APr"))
    np.testing.assert_array_equal(fast.category_ids, reference.category_ids)
    np.testing.assert_allclose(fast.per_class_ap, reference.per_class_ap, atol=1e-6, equal_nan=True)

    ap = dict(zip(reference.category_ids.tolist(), reference.per_class_ap))
    assert math.isnan(ap[ABSENT_RARE]) and ap[UNDETECTED] == 0.0
    # The split APs are the mean per-class AP of each split's classes that have ground truth.
    for freq, key in zip("rcf", ("APr", "APc", "APf")):
        group = [ap[c] for c, f in zip(CAT_IDS, FREQS) if f == freq and not math.isnan(ap[c])]
        assert np.mean(group) == pytest.approx(reference.metrics[key], abs=1e-9)


def test_segm_areas_come_from_masks_without_bbox() -> None:
    """With a 'bbox', LVIS takes a mask result's area from the box, without one from the mask:
    the size buckets differ, and both backends follow."""
    gt, results = make_set(3)
    with_box = both(gt, results, "segm")
    without = both(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
    assert_same(with_box[0].metrics, with_box[1].metrics)
    assert_same(without[0].metrics, without[1].metrics)
    assert with_box[1].metrics["APs"] != without[1].metrics["APs"]


@pytest.mark.parametrize("max_dets", [1, 5, 300])
def test_backends_agree_under_the_per_image_cap(max_dets: int) -> None:
    gt, results = make_set(4)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    fast, reference = both(gt, results, "bbox", max_dets=max_dets)
    assert_same(fast.metrics, reference.metrics)
    np.testing.assert_allclose(fast.per_class_ap, reference.per_class_ap, atol=1e-6, equal_nan=True)


def test_no_rare_class_in_the_set() -> None:
    gt, results = make_set(5)
    rare = {c for c, f in zip(CAT_IDS, FREQS) if f == "r"}
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] not in rare]
    for img in gt["images"]:
        img["neg_category_ids"] = [c for c in img["neg_category_ids"] if c not in rare]
        img["not_exhaustive_category_ids"] = [c for c in img["not_exhaustive_category_ids"] if c not in rare]
    fast, reference = both(gt, results, "bbox")
    assert math.isnan(fast.metrics["APr"]) and math.isnan(reference.metrics["APr"])
    assert_same(fast.metrics, reference.metrics)


def test_unusual_but_valid_input_takes_the_entry_by_entry_path() -> None:
    """Float image ids and NumPy scalars skip the array fast path; the numbers do not change."""
    gt, results = make_set(6)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    odd = [{**r, "image_id": float(r["image_id"]), "score": np.float32(r["score"])} for r in results]
    plain = evaluate_detections(gt, results)
    assert_same(evaluate_detections(gt, odd), plain)
    assert_same(evaluate_detections(gt, odd, backend="lvis"), plain)


def test_unknown_backend_is_a_clear_error() -> None:
    gt, results = make_set(0, num_images=4)
    with pytest.raises(ValueError, match="unknown metric backend 'pycoco'.*'hotcoco'.*'lvis'"):
        evaluate_detections(gt, results, backend="pycoco")


def test_what_hotcoco_reads_differently_is_made_explicit() -> None:
    """The LVIS API ignores 'iscrowd' and leaves out areas outside (0, inf) (a polygon thinner than
    a pixel, an empty mask), both after its per-image cap; hotcoco is given the data that way."""
    gt, results = make_set(9)
    for i, ann in enumerate(gt["annotations"]):
        ann["iscrowd"] = int(i % 4 == 0)
        if i % 7 == 0:
            ann["area"] = 0.0
    empty = {"size": [H, W], "counts": rle_of([0.0, 0.0, 0.1, 0.0, 0.1, 0.1])["counts"]}
    assert mask_utils.area(empty) == 0
    masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    for i, r in enumerate(masks):
        if i % 5 == 0:  # empty masks, the best-scored of their image: they take slots of the cap
            masks[i] = {**r, "segmentation": empty, "score": 0.99}
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    for iou_type, res in (("bbox", boxes), ("segm", masks)):
        for max_dets in (3, 300):
            fast, reference = both(gt, res, iou_type, max_dets=max_dets)
            assert_same(fast.metrics, reference.metrics)
            np.testing.assert_allclose(fast.per_class_ap, reference.per_class_ap, atol=1e-6, equal_nan=True)


def test_ignore_flags_go_to_the_lvis_api_with_a_warning() -> None:
    gt, results = make_set(10)
    for i, ann in enumerate(gt["annotations"]):
        ann["ignore"] = int(i % 3 == 0)
    with pytest.warns(UserWarning, match=r"carry 'ignore', which hotcoco does not read"):
        fast = evaluate_results(gt, results, "bbox")
    reference = evaluate_results(gt, results, "bbox", backend="lvis")
    assert fast.backend == "lvis"
    assert_same(fast.metrics, reference.metrics)
    plain = evaluate_detections(make_set(10)[0], results, "bbox", backend="lvis")
    assert plain["AP"] != reference.metrics["AP"]  # the flags do change the LVIS API's numbers


def test_fit_takes_the_backend_and_rejects_an_unknown_one(tmp_path) -> None:
    from regionspot_pl import fit
    from regionspot_pl.config import ConfigError
    from regionspot_pl.train.module import RegionSpotModule

    assert fit.COMMAND.parse(["--stage", "demo", "--metric_backend", "lvis"]).metric_backend == "lvis"
    assert fit.COMMAND.parse(["--stage", "demo"]).metric_backend == "hotcoco"
    with pytest.raises(ConfigError, match="--metric_backend must be one of hotcoco, lvis, got pycoco"):
        fit.run({"out": str(tmp_path), "metric_backend": "pycoco"})
    head = {"clip_dim": 32, "text_dim": 16, "ffn_dim": 32, "num_heads": 2}
    assert RegionSpotModule(head=head).hparams.metric_backend == "hotcoco"
    assert RegionSpotModule(head=head, metric_backend="lvis").hparams.metric_backend == "lvis"
