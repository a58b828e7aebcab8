"""The report of an evaluation: OUT/report.md, OUT/ap_per_class.png and OUT/ap_per_class.csv.

``python -m regionspot_pl.test`` and ``python -m regionspot_pl.evaluate --out DIR`` write it:

- report.md: what was evaluated against what (ground truth, results or shards and head, backend,
  images and detections), the metrics table, AP by frequency group, the 20 best and worst classes.
- ap_per_class.png: per-class AP sorted, one panel per IoU type, bars coloured by frequency group.
- ap_per_class.csv: category_id, name, frequency, AP per IoU type (fractions; empty where the
  class has no ground truth), GT instances, GT images.

Both commands write the metrics themselves with :func:`write_metrics` (OUT/metrics.json).

Per-class AP is :attr:`Evaluation.per_class_ap`: the same computation for every backend.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import write_json_atomic
from .metrics import LVIS_METRICS, Evaluation

FREQUENCY_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
# Colour-blind-safe (Okabe-Ito): rare vermillion, common orange, frequent blue; grey without groups.
FREQUENCY_COLOURS = {"r": "#D55E00", "c": "#E69F00", "f": "#0072B2", "": "#777777"}
TOP = 20  # best and worst classes listed in the report

REPORT, PLOT, TABLE, METRICS = "report.md", "ap_per_class.png", "ap_per_class.csv", "metrics.json"


@dataclass(frozen=True)
class ClassRow:
    """One category: identity, GT counts, and its AP per IoU type (NaN without ground truth)."""

    category_id: int
    name: str
    frequency: str  # "r", "c", "f", or "" for COCO-style data
    instances: int  # GT annotations of the class
    images: int  # GT images holding at least one
    ap: dict[str, float]  # iou_type -> AP in [0, 1]


def class_rows(gt: Mapping[str, Any], evaluations: Mapping[str, Evaluation]) -> list[ClassRow]:
    """One row per GT category, in category-id order.

    Args:
        gt: the COCO/LVIS annotation dict the evaluations were made against.
        evaluations: ``{iou_type: Evaluation}``, e.g. bbox and segm.
    """
    instances = Counter(a["category_id"] for a in gt["annotations"])
    images = Counter(cat for _, cat in {(a["image_id"], a["category_id"]) for a in gt["annotations"]})
    per_type = {t: dict(zip(e.category_ids.tolist(), e.per_class_ap.tolist())) for t, e in evaluations.items()}
    rows = []
    for cat in sorted(gt["categories"], key=lambda c: c["id"]):
        cid = cat["id"]
        rows.append(
            ClassRow(
                category_id=cid,
                name=str(cat.get("name", cid)),
                frequency=cat.get("frequency", ""),
                instances=instances.get(cid, 0),
                images=images.get(cid, 0),
                ap={t: per_type[t].get(cid, math.nan) for t in evaluations},
            )
        )
    return rows


def write_metrics(out: str | Path, evaluations: Mapping[str, Evaluation], scoring: str | None = None) -> Path:
    """OUT/metrics.json, written atomically: ``{iou_type: {metric: fraction}}`` with the metrics the
    evaluator gives (COCO-style data has no APr/APc/APf); null where there was nothing to score.
    ``scoring``: the rule that ranked the detections (``"scoring"`` first in the file), None when
    not known (a results file scored elsewhere)."""
    payload: dict[str, Any] = {} if scoring is None else {"scoring": scoring}
    for t, e in evaluations.items():
        payload[t] = {k: None if math.isnan(v) else float(v) for k, v in e.metrics.items()}
    return write_json_atomic(Path(out) / METRICS, payload, indent=2)


def write_report(
    out: str | Path,
    evaluations: Mapping[str, Evaluation],
    gt: Mapping[str, Any],
    sources: Mapping[str, str],
    seconds: float | None = None,
) -> dict[str, Path]:
    """Write report.md, ap_per_class.png and ap_per_class.csv into ``out`` (created if needed).

    Args:
        out: output folder.
        evaluations: ``{iou_type: Evaluation}`` of one run, the first one ranks the classes.
        gt: the annotation dict they were scored against (for names, frequencies, counts).
        sources: what was evaluated, in order, e.g. ``{"ground truth": path, "results": path}``
            or ``{"ground truth": ..., "shards": ..., "head": ...}``.
        seconds: time of the metric step, reported when given.

    Returns:
        ``{"report": path, "plot": path, "csv": path}``.
    """
    if not evaluations:
        raise ValueError("no evaluation to report: evaluate at least one IoU type first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = class_rows(gt, evaluations)
    paths = {"report": out / REPORT, "plot": out / PLOT, "csv": out / TABLE}
    _write_csv(paths["csv"], rows, list(evaluations))
    _plot(paths["plot"], rows, evaluations)
    text = _markdown(rows, evaluations, _provenance(rows, evaluations, gt, sources, seconds))
    paths["report"].write_text(text)
    return paths


# --------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _markdown(rows: list[ClassRow], evaluations: Mapping[str, Evaluation], provenance: list[str]) -> str:
    """report.md: the provenance table, the metrics, the frequency groups, the best and worst classes."""
    first = next(iter(evaluations.values()))
    types = list(evaluations)
    lines = ["# Evaluation report", "", *provenance]
    lines += ["", "## Metrics (AP, %)", ""]
    keys = [k for k in LVIS_METRICS if any(k in e.metrics for e in evaluations.values())]
    lines += _table(
        ["", *keys], [[t, *(_pct(e.metrics.get(k, math.nan)) for k in keys)] for t, e in evaluations.items()]
    )
    lines += ["", "## AP by frequency group (%)", ""]
    lines += _groups(rows, evaluations)
    # Ties (several classes at 100, or at 0) list the class with more objects first: the surer result.
    scored = [r for r in rows if not math.isnan(r.ap[first.iou_type])]
    best = sorted(scored, key=lambda r: (-r.ap[first.iou_type], -r.instances, r.category_id))
    worst = sorted(scored, key=lambda r: (r.ap[first.iou_type], -r.instances, r.category_id))
    header = ["#", "category", "id", "frequency", *(f"{t} AP" for t in types), "GT instances", "GT images"]

    def listing(selected: list[ClassRow], start: int, step: int) -> list[str]:
        return _table(
            header,
            [
                [
                    start + step * i,
                    r.name,
                    r.category_id,
                    FREQUENCY_NAMES.get(r.frequency, "-"),
                    *(_pct(r.ap[t]) for t in types),
                    r.instances,
                    r.images,
                ]
                for i, r in enumerate(selected)
            ],
        )

    n = len(scored)
    lines += ["", f"## The {min(TOP, n)} best classes ({first.iou_type} AP)", ""]
    lines += listing(best[:TOP], 1, 1)
    lines += ["", f"## The {min(TOP, n)} worst classes ({first.iou_type} AP)", ""]
    lines += listing(worst[:TOP], n, -1)  # numbered by rank, n the last
    missing = len(rows) - n
    lines += [
        "",
        f"{n} of {len(rows)} classes have ground truth in this set and are ranked"
        + (f"; the other {missing} have no AP (nothing to find)." if missing else "."),
    ]
    lines += [
        "",
        f"![{first.iou_type} AP per class, sorted]({PLOT})",
        "",
        f"Per-class AP of every class: [{TABLE}]({TABLE}) (fractions).",
        "",
    ]
    return "\n".join(lines)


def _provenance(
    rows: list[ClassRow],
    evaluations: Mapping[str, Evaluation],
    gt: Mapping[str, Any],
    sources: Mapping[str, str],
    seconds: float | None,
) -> list[str]:
    """The 'what against what' table: sources, protocol, backend, sizes, time."""
    first = next(iter(evaluations.values()))
    groups = Counter(r.frequency for r in rows)
    split = ", ".join(f"{groups[f]} {FREQUENCY_NAMES[f]}" for f in "rcf" if groups[f])
    cells = [[name, f"`{value}`"] for name, value in sources.items()]
    cells.append(
        [
            "ground truth size",
            f"{len(gt['images'])} images, {len(gt['annotations'])} objects, "
            f"{len(rows)} categories" + (f" ({split})" if split else ""),
        ]
    )
    protocol = (
        f"LVIS (federated), at most {first.max_dets} detections per image"
        if first.kind == "lvis"
        else f"COCO, at most {first.max_dets} detections per image and class"
    )
    cells.append(["protocol", protocol])
    cells.append(["backend", _backend_name(first.backend, first.kind)])
    for t, e in evaluations.items():
        cells.append([f"{t} detections", f"{e.num_detections} ({e.num_images} images evaluated)"])
    if seconds is not None:
        cells.append(["metric step", f"{seconds:.1f} s"])
    return _table(["", ""], cells)


def _backend_name(backend: str, kind: str) -> str:
    if backend == "hotcoco":
        from importlib.metadata import version

        return f"hotcoco {version('hotcoco')}"
    return "LVIS API (lvis)" if kind == "lvis" else "pycocotools COCOeval"


def _groups(rows: list[ClassRow], evaluations: Mapping[str, Evaluation]) -> list[str]:
    """Per frequency group: classes, classes with GT here, GT instances, AP per IoU type."""
    keys = {"r": "APr", "c": "APc", "f": "APf"}
    table = []
    for freq in ("r", "c", "f", None):
        members = [r for r in rows if freq is None or r.frequency == freq]
        if freq is not None and not members:
            continue
        with_gt = sum(1 for r in members if r.instances > 0)
        aps = [_pct(e.metrics.get(keys[freq], math.nan) if freq else e.metrics["AP"]) for e in evaluations.values()]
        name = FREQUENCY_NAMES[freq] if freq else "all"
        table.append([name, len(members), with_gt, sum(r.instances for r in members), *aps])
    return _table(["group", "classes", "with GT here", "GT instances", *(f"{t} AP" for t in evaluations)], table)


# --------------------------------------------------------------------------------------------
# ap_per_class.csv and ap_per_class.png
# --------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[ClassRow], types: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category_id", "name", "frequency", *(f"AP_{t}" for t in types), "gt_instances", "gt_images"])
        for r in rows:
            aps = ["" if math.isnan(r.ap[t]) else f"{r.ap[t]:.6f}" for t in types]
            writer.writerow([r.category_id, r.name, r.frequency, *aps, r.instances, r.images])


def _plot(path: Path, rows: list[ClassRow], evaluations: Mapping[str, Evaluation]) -> None:
    """One panel per IoU type: AP of each class with ground truth, best first, coloured by group.

    Drawn on a bare Figure with the Agg canvas: no pyplot, so no global backend is set.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = Figure(figsize=(8, 2.8 * len(evaluations)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(evaluations), 1, squeeze=False)[:, 0]
    for ax, (t, e) in zip(axes, evaluations.items()):
        ranked = sorted((r for r in rows if not math.isnan(r.ap[t])), key=lambda r: -r.ap[t])
        ap = np.array([100 * r.ap[t] for r in ranked])
        colours = [FREQUENCY_COLOURS.get(r.frequency, FREQUENCY_COLOURS[""]) for r in ranked]
        ax.bar(np.arange(len(ranked)), ap, width=1.0, color=colours, linewidth=0)
        ax.axhline(100 * e.metrics["AP"], color="black", linewidth=1.0, linestyle="--")
        ax.set_xlim(-0.5, max(len(ranked), 1) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{t} AP (%)")
        ax.set_xlabel(f"categories with ground truth ({len(ranked)}), sorted by {t} AP")
        handles = [
            Patch(color=FREQUENCY_COLOURS[f], label=_legend_label(f, ranked, e))
            for f in "rcf"
            if any(r.frequency == f for r in ranked)
        ]
        handles.append(
            Line2D([], [], color="black", linewidth=1.0, linestyle="--", label=f"AP {_pct(e.metrics['AP'])} (all)")
        )
        # above the bars, which fill the panel up to 100
        ax.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
            handlelength=1.5,
            columnspacing=1.2,
        )
    fig.savefig(path)


def _legend_label(freq: str, ranked: list[ClassRow], e: Evaluation) -> str:
    n = sum(1 for r in ranked if r.frequency == freq)
    ap = e.metrics.get({"r": "APr", "c": "APc", "f": "APf"}[freq], math.nan)
    return f"{FREQUENCY_NAMES[freq]} ({n} classes, AP{freq} {_pct(ap)})"
