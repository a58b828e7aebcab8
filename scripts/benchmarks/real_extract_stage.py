"""Extraction at real size: ``FeatureExtractor`` (the code ``extract`` runs) over demo images and
their boxes, one row per setting (precision, ``--compile``, images per encoder call), each against
the device's *measured* matmul rate in that precision on the FLOPs counted per image; and one
pass under ``torch.profiler`` for the share of wall time no GPU kernel covers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from regionspot_pl.backbones.common import PRECISION_DTYPES, resolved_precision
from regionspot_pl.data.records import ImageRecord
from regionspot_pl.extract.features import FeatureExtractor, ImageFeaturesInput
from regionspot_pl.extract.run import ExtractConfig, load_extractor

from .common import Table, matmul_gflops, now, sync
from .real_backbones import Backbones


@dataclasses.dataclass(frozen=True)
class ExtractSetting:
    """One timed extraction pass: ``--precision``, ``--compile`` and ``--batch_size``."""

    precision: str
    compiled: bool
    batch: int

    def __str__(self) -> str:
        return f"batch {self.batch}, --precision {self.precision}" + (" --compile" if self.compiled else "")


def supported_precisions(device: torch.device) -> list[str]:
    """The device's own precision first (what --precision auto picks), then the others it runs."""
    first = resolved_precision(device, "auto")
    others = ["fp16", "fp32"] if device.type == "cuda" else ["bf16"]
    return [first, *(p for p in others if p != first)]


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def timed_pass(extractor: FeatureExtractor, prepared: list[list[dict]], device: torch.device) -> tuple[float, float]:
    """(seconds of a pass over the prepared batches, seconds of the warm-up batch before it)."""
    start = now()
    extractor(prepared[0], "bench")  # warm-up, compilation included
    first = now() - start
    sync(device)
    start = now()
    for items in prepared:
        extractor(items, "bench")
    sync(device)
    return now() - start, first


def bench_extraction(
    table: Table, backbones: Backbones, out: Path, device: torch.device, data: dict, records: list[ImageRecord],
    settings: Iterable[ExtractSetting], profile: ExtractSetting | None = None, deadline: float = float("inf"),
) -> None:  # fmt: skip
    """One row per setting in order over ``records`` of the demo scenes ``data`` (a setting that
    would start after ``deadline``, a ``time.perf_counter`` value, is listed as skipped);
    ``profile``: that setting once more under the profiler, into OUT/profile."""
    num_images, boxes = len(records), sum(len(r.boxes) for r in records)
    cfg = ExtractConfig(
        images=str(data["train_images"]), annotations=str(data["train_json"]), out=str(out / "x"),
        sam_checkpoint=str(backbones.sam_checkpoint), clip_model=str(backbones.clip_dir),
        sam_type=backbones.sam_type, device=str(device),
    )  # fmt: skip
    items, tflop = None, None
    for setting in settings:
        if now() > deadline:
            table.add(f"real extract ({device.type}): {backbones.label}, {setting}", "skipped: time budget spent")
            continue
        extractor = load_extractor(dataclasses.replace(cfg, precision=setting.precision, compile=setting.compiled))
        if items is None:  # decoded and resized once, as DataLoader workers do in a real run
            dataset = ImageFeaturesInput([(0, r) for r in records], cfg.images, extractor.encoder.segmenter.transform)
            items = [dataset[i] for i in range(len(dataset))]
        prepared = [items[b : b + setting.batch] for b in range(0, len(items), setting.batch)]
        if tflop is None:
            tflop = backbones.tflop_per_image(extractor, prepared[0], boxes / num_images)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, first = timed_pass(extractor, prepared, device)
        extraction_row(table, backbones, device, setting, num_images / seconds, boxes / seconds, first, tflop)
        if setting == profile:
            summary = profile_extraction(extractor, prepared, device, out / "profile")
            idle = summary["gpu_idle_fraction"]
            table.add(
                f"real profile ({device.type}): {backbones.label}, {setting}",
                "no GPU" if idle is None else f"GPU idle {idle:.1%} of {summary['wall_s']:.2f} s",
                f"{summary['kernels']} kernels" if idle is not None else "-", **summary,
            )  # fmt: skip
        del extractor
        if device.type == "cuda":
            torch.cuda.empty_cache()


def extraction_row(
    table: Table, backbones: Backbones, device: torch.device, setting: ExtractSetting, rate: float,
    box_rate: float, first: float, tflop: float,
) -> None:  # fmt: skip
    """Images/s, and the share of the device's measured matmul rate in the setting's precision it reaches."""
    size = 512 if backbones.tiny else 8192 if device.type == "cuda" else 2048  # tiny: a check, not a measurement
    limit = matmul_gflops(PRECISION_DTYPES[setting.precision], device, size) / 1e3
    peak = f", peak {peak_memory_gib(device):.1f} GiB" if device.type == "cuda" else ""
    table.add(
        f"real extract ({device.type}): {backbones.label}, {setting}",
        f"{rate:.3g} img/s, {box_rate:.3g} box/s{peak} (first batch {first:.0f} s)",
        f"{tflop * rate:.3g} of {limit:.3g} TFLOP/s measured {setting.precision} matmul",
        100 * tflop * rate / limit,
        ratio_fmt="{:.0f}%",
        target=">= 40% (GPU)",
        met=tflop * rate / limit >= 0.4 if device.type == "cuda" else None,
        sam_type=backbones.sam_type,
        precision=setting.precision,
        compiled=setting.compiled,
        batch=setting.batch,
        images_per_s=rate,
        tflop_per_image=tflop,
        matmul_tflops=limit,
        peak_gib=peak_memory_gib(device),
    )


def busy_fraction(intervals: list[tuple[float, float]], wall_us: float) -> float:
    """Share of ``wall_us`` covered by the union of (start, end) intervals (kernels may overlap)."""
    covered, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered / max(wall_us, 1e-9)


def profile_extraction(extractor: FeatureExtractor, prepared: list, device: torch.device, out: Path) -> dict:
    """One extraction pass under torch.profiler: top ops/kernels, a Chrome trace, GPU idle share."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        start = now()
        for items in prepared:
            extractor(items, "bench")
        sync(device)
        wall_us = (now() - start) * 1e6
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / "top_ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    prof.export_chrome_trace(str(out / "trace.json"))
    summary = {"device": str(device), "wall_s": wall_us / 1e6, "gpu_idle_fraction": None, "kernels": 0}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        starts = min((e.time_range.start for e in kernels), default=0.0)
        spans = [(e.time_range.start - starts, e.time_range.end - starts) for e in kernels]
        summary["gpu_idle_fraction"] = 1.0 - busy_fraction(spans, wall_us)
        summary["kernels"] = len(kernels)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    idle = summary["gpu_idle_fraction"]
    print(f"[bench-real] profile written to {out}/ (GPU idle {'n/a on CPU' if idle is None else f'{idle:.0%}'})")
    return summary
