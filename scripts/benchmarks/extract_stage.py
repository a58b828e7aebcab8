"""Extraction: ours (``FeatureExtractor`` on batches, as ``run_extraction`` runs it) against the
naive way (segment-anything's ``SamPredictor``: set_image per image, predict per box; CLIP one
image at a time), both on the tiny backbones and the demo images, split into the same parts."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from regionspot_pl.backbones.encoder import ImageFeatures
from regionspot_pl.backbones.image import masks_to_original, read_image, resize_for_backbones
from regionspot_pl.backbones.interfaces import Prompts
from regionspot_pl.cache.shards import AtomicShardWriter, encode_sample
from regionspot_pl.data.records import ImageRecord, load_coco
from regionspot_pl.extract.features import FeatureExtractor, ImageFeaturesInput
from regionspot_pl.extract.run import ExtractConfig, load_extractor
from regionspot_pl.utils.io import masks_to_rle

from .common import Table, counted_gflop, matmul_gflops, now

BATCH = 8  # extraction batch (run_extraction's default)
PARTS = {
    "prep": "image decode + preprocess",
    "sam_encoder": "SAM image encoder",
    "clip": "CLIP encoder",
    "decoder": "prompt/mask decoder",
    "rle": "mask RLE",
    "write": "sample encoding + tar write",
}
# extract's speed options, each timed on run_extraction's loop after a warm-up pass (compilation
# included): bf16 autocast (fast only on CPUs with AVX512-BF16/AMX, as on GPUs) and torch.compile
OPTIONS = {
    "--precision bf16": {"precision": "bf16"},
    "--compile": {"compile": True},
    "--compile --precision bf16": {"compile": True, "precision": "bf16"},
}


def _meta(rec: ImageRecord, rles: list) -> dict:
    return {"file_name": rec.file_name, "width": rec.width, "height": rec.height, "dataset": "bench", "masks": rles}


@dataclasses.dataclass
class ExtractionBench:
    """The images, the extractor and SamPredictor, and the three ways of running them."""

    cfg: ExtractConfig
    records: list[ImageRecord]
    extractor: FeatureExtractor
    dataset: ImageFeaturesInput
    scratch: Path

    @classmethod
    def build(cls, out: Path, data: dict, backbones: dict, num_images: int) -> ExtractionBench:
        records, _, _ = load_coco(data["train_json"])
        records = sorted(records, key=lambda r: r.image_id)[:num_images]
        cfg = ExtractConfig(
            images=str(data["train_images"]), annotations=str(data["train_json"]), out=str(out / "x"),
            sam_checkpoint=str(backbones["sam_checkpoint"]), clip_model=str(backbones["clip_dir"]),
            sam_type="tiny", device="cpu", batch_size=BATCH, precision="fp32",
        )  # fmt: skip
        extractor = load_extractor(cfg)
        dataset = ImageFeaturesInput([(0, r) for r in records], cfg.images, extractor.encoder.segmenter.transform)
        scratch = out / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        bench = cls(cfg, records, extractor, dataset, scratch)
        # warm-up: one batch through everything (first-call allocations, lazy inits)
        extractor([dataset[i] for i in range(min(BATCH, len(dataset)))], "bench")
        return bench

    @property
    def num_boxes(self) -> int:
        return sum(len(r.boxes) for r in self.records)

    def end_to_end(self, workers: int, extractor: FeatureExtractor | None = None) -> float:
        """Seconds of run_extraction's loop: DataLoader decoding workers -> FeatureExtractor -> writer."""
        extract = extractor or self.extractor
        loader = DataLoader(self.dataset, batch_size=BATCH, num_workers=workers, collate_fn=list)
        writer = AtomicShardWriter(self.scratch / f"e2e-w{workers}.tar")
        start = now()
        for items in loader:
            for sample in extract(items, "bench"):
                writer.write(sample)
        writer.commit({})
        return now() - start

    def ours_batch(self, b: int, split: dict, writer: AtomicShardWriter) -> None:
        """Ours on images [b, b + BATCH), split into parts with the calls FeatureExtractor makes."""
        encoder = self.extractor.encoder
        with torch.inference_mode():
            t = now()
            items = [self.dataset[i] for i in range(b, min(b + BATCH, len(self.dataset)))]
            inputs = [it["input"] for it in items]
            split["prep"] += now() - t
            t = now()
            embeddings = encoder.embed_images(encoder.segmenter_batch(inputs))
            split["sam_encoder"] += now() - t
            t = now()
            image_tokens = encoder.image_tokens(encoder.vlm_batch(inputs))
            split["clip"] += now() - t
            for it, embedding, tokens in zip(items, embeddings, image_tokens):
                features = ImageFeatures(embedding, tokens, it["input"].original_size, it["input"].resized_size)
                self._ours_image(it, features, split, writer)

    def _ours_image(self, item: dict, features: ImageFeatures, split: dict, writer: AtomicShardWriter) -> None:
        """One image's decoder (masks to the original size included), mask RLE and sample, as
        FeatureExtractor and run_extraction do them."""
        rec = item["record"]
        t = now()
        regions = self.extractor.encoder.decode([features], [Prompts(boxes=torch.from_numpy(rec.boxes))])[0]
        split["decoder"] += now() - t
        t = now()
        rles = masks_to_rle(regions.masks)
        split["rle"] += now() - t
        t = now()
        tokens, clip_tokens = regions.tokens.float().cpu().numpy(), features.image_tokens.cpu().numpy()
        iou = regions.iou.cpu().numpy()
        writer.write(
            encode_sample(
                rec.image_id, tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, _meta(rec, rles), iou=iou
            )
        )
        split["write"] += now() - t

    def naive_batch(self, b: int, naive: dict, writer: AtomicShardWriter, predictor) -> None:
        """The naive way on the same images [b, b + BATCH): SamPredictor per box, CLIP per image
        (the same tiny models, fp32, no_grad as SamPredictor)."""
        sam = self.extractor.encoder.segmenter.sam
        captured: list[torch.Tensor] = []
        hook = sam.mask_decoder.transformer.register_forward_hook(lambda _m, _i, o: captured.append(o[0]))
        try:
            for rec in self.records[b : b + BATCH]:
                self._naive_image(rec, naive, writer, predictor, captured)
        finally:
            hook.remove()

    def _naive_image(self, rec: ImageRecord, naive: dict, writer: AtomicShardWriter, predictor, captured: list) -> None:
        clip = self.extractor.encoder.vlm
        t = now()
        image, _ = read_image(Path(self.cfg.images) / rec.file_name)
        resized = resize_for_backbones(image)
        sam_input = torch.as_tensor(predictor.transform.apply_image(resized)).permute(2, 0, 1)[None].contiguous()
        clip_input = clip.preprocess(torch.from_numpy(resized).permute(2, 0, 1))[None]
        naive["prep"] += now() - t
        t = now()
        predictor.set_torch_image(sam_input, resized.shape[:2])
        naive["sam_encoder"] += now() - t
        t = now()
        with torch.no_grad():
            clip_tokens = clip.feature_map(clip_input)[0].half().numpy()
        naive["clip"] += now() - t
        tokens, rles, ious = [], [], []
        (h, w), (rh, rw) = image.shape[:2], resized.shape[:2]
        for box in rec.boxes:
            t = now()
            captured.clear()
            mask, iou, _ = predictor.predict(
                box=box * np.array([rw / w, rh / h, rw / w, rh / h]), multimask_output=False
            )
            tokens.append(captured[0][0, 1].float().numpy())
            ious.append(float(iou[0]))
            naive["decoder"] += now() - t
            t = now()
            rles += masks_to_rle(masks_to_original(torch.from_numpy(mask), (h, w)))
            naive["rle"] += now() - t
        t = now()
        sam_tokens = np.stack(tokens) if tokens else np.zeros((0, 256), np.float32)
        meta = _meta(rec, rles)
        writer.write(
            encode_sample(
                rec.image_id, sam_tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, meta, iou=np.array(ious)
            )
        )
        naive["write"] += now() - t

    def alternate(self, reps: int) -> tuple[dict, dict]:
        """(ours, naive) seconds by part, summed over ``reps`` passes. The two alternate batch by
        batch (which goes first alternates too), so that load from other processes on a shared
        machine falls on both sides alike."""
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.extractor.encoder.segmenter.sam)
        ours, naive = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
        for r in range(reps):
            w_ours, w_naive = (
                AtomicShardWriter(self.scratch / "ours.tar"),
                AtomicShardWriter(self.scratch / "naive.tar"),
            )
            for k, b in enumerate(range(0, len(self.dataset), BATCH)):
                if (k + r) % 2:
                    self.naive_batch(b, naive, w_naive, predictor)
                    self.ours_batch(b, ours, w_ours)
                else:
                    self.ours_batch(b, ours, w_ours)
                    self.naive_batch(b, naive, w_naive, predictor)
            w_ours.commit({})
            w_naive.commit({})
        return ours, naive

    def options(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """{flags: (best of two timed passes, the warm-up pass)} of run_extraction's loop (workers 0)."""
        timed = {}
        for flags in names:
            variant = load_extractor(dataclasses.replace(self.cfg, **OPTIONS[flags]))
            warm_up = self.end_to_end(0, variant)
            timed[flags] = (min(self.end_to_end(0, variant), self.end_to_end(0, variant)), warm_up)
            del variant
        return timed

    def decoder_gflop_per_box(self) -> float:
        """The decoder's arithmetic per box, counted on the image with the most boxes."""
        encoder = self.extractor.encoder
        rec = max(self.records, key=lambda r: len(r.boxes))
        with torch.inference_mode():
            image = self.dataset[self.records.index(rec)]["input"]
            embedding = encoder.embed_images(encoder.segmenter_batch([image]))
            prompts = Prompts(boxes=torch.from_numpy(rec.boxes)).scaled(image.original_size, image.resized_size)
            decode = lambda: encoder.segmenter.decode(embedding, [prompts], [image.resized_size])  # noqa: E731
            return counted_gflop(decode) / len(rec.boxes)


def bench_extraction(
    table: Table, out: Path, data: dict, backbones: dict, num_images: int, reps: int, options: list[str],
    matmul_size: int = 2048,
) -> dict:  # fmt: skip
    """The extraction rows: ours against naive, the ``options`` (names of OPTIONS), the decoder's
    arithmetic against the CPU's matmul rate (measured on ``matmul_size`` square matrices),
    loader workers, and each part."""
    bench = ExtractionBench.build(out, data, backbones, num_images)
    ours, naive = bench.alternate(reps)
    e2e = {w: bench.end_to_end(w) for w in (0, 2)}
    e2e_fp32 = min(e2e[0], bench.end_to_end(0))
    variants = bench.options(options)
    n_img, n_box = reps * num_images, reps * bench.num_boxes
    ours_total, naive_total = sum(ours.values()), sum(naive.values())
    ratio = naive_total / ours_total
    table.add(
        f"extract: tiny SAM@{bench.extractor.encoder.segmenter.image_size}+tiny CLIP, "
        f"{num_images} img / {bench.num_boxes} boxes x{reps}",
        f"{n_img / ours_total:.1f} img/s, {n_box / ours_total:.0f} box/s (batch {BATCH})",
        f"{n_img / naive_total:.1f} img/s, {n_box / naive_total:.0f} box/s (SamPredictor per box)",
        ratio, target=">= 5x", met=ratio >= 5,
        seconds_ours=ours_total, seconds_naive=naive_total, images=n_img, boxes=n_box,
    )  # fmt: skip
    _option_rows(table, variants, num_images, e2e_fp32, naive_total / reps)
    _decoder_rows(table, bench.decoder_gflop_per_box(), n_box, ours["decoder"], naive["decoder"], matmul_size)
    table.add(
        "extract: run_extraction's loop (DataLoader), workers 2 vs 0",
        f"w2 {num_images / e2e[2]:.1f} img/s",
        f"w0 {num_images / e2e[0]:.1f} img/s",
        e2e[0] / e2e[2],
        seconds_by_workers=e2e,
    )
    _part_rows(table, ours, naive, n_img)
    shutil.rmtree(bench.scratch, ignore_errors=True)
    return {"ours_s": ours_total, "naive_s": naive_total, "split": ours, "naive": naive}


def _option_rows(table: Table, variants: dict, num_images: int, e2e_fp32: float, naive_pass_s: float) -> None:
    """Each option against default fp32, and the fastest one against naive (one pass each)."""
    for flags, (seconds, warm_up) in variants.items():
        table.add(
            f"extract: run_extraction's loop, {flags} vs default fp32 (workers 0)",
            f"{num_images / seconds:.1f} img/s (first pass {warm_up:.0f} s)",
            f"{num_images / e2e_fp32:.1f} img/s",
            e2e_fp32 / seconds,
            seconds=seconds,
            first_pass_seconds=warm_up,
            seconds_fp32=e2e_fp32,
        )
    if not variants:
        return
    fastest = min(variants, key=lambda k: variants[k][0])
    best = naive_pass_s / variants[fastest][0]
    table.add(
        f"extract: fastest option ({fastest}) vs naive (SamPredictor per box)",
        f"{num_images / variants[fastest][0]:.1f} img/s",
        f"{num_images / naive_pass_s:.1f} img/s",
        best,
        target=">= 5x",
        met=best >= 5,
    )


def _decoder_rows(table: Table, per_box: float, boxes: int, ours_s: float, naive_s: float, size: int) -> None:
    """The decoder's arithmetic against what this CPU's matmul units deliver: how much room is left."""
    rate = {dtype: matmul_gflops(dtype, n=size) for dtype in (torch.float32, torch.bfloat16)}
    fp32, work_gflop = rate[torch.float32], per_box * boxes
    table.add(
        f"extract: decoder arithmetic ({per_box:.2f} GFLOP/box counted) vs CPU fp32 matmul rate",
        f"{work_gflop / ours_s:.0f} GFLOP/s = {100 * work_gflop / ours_s / fp32:.0f}%",
        f"naive {work_gflop / naive_s:.0f} GFLOP/s = {100 * work_gflop / naive_s / fp32:.0f}%",
        100 * work_gflop / ours_s / fp32,
        ratio_fmt="{:.0f}%",
        gflop_per_box=per_box,
    )
    table.add(
        f"cpu: measured matmul rate ({size} x {size}, torch), bf16 vs fp32",
        f"bf16 {rate[torch.bfloat16]:.0f} GFLOP/s",
        f"fp32 {fp32:.0f} GFLOP/s",
        rate[torch.bfloat16] / fp32,
        fp32_gflops=fp32,
        bf16_gflops=rate[torch.bfloat16],
    )


def _part_rows(table: Table, ours: dict, naive: dict, num_images: int) -> None:
    """Each part's ms per image, ours against naive, with its share of each side's total."""
    ours_total, naive_total = sum(ours.values()), sum(naive.values())
    for key, label in PARTS.items():
        shares = f"{100 * ours[key] / ours_total:.0f}% of ours, {100 * naive[key] / naive_total:.0f}% of naive"
        table.add(
            f"extract: {label} [{shares}]",
            f"{1000 * ours[key] / num_images:.1f} ms/img",
            f"{1000 * naive[key] / num_images:.1f} ms/img",
            naive[key] / max(ours[key], 1e-9),
            ms_per_image_ours=1000 * ours[key] / num_images,
            ms_per_image_naive=1000 * naive[key] / num_images,
        )
