"""bench-real's segmenter rows: SAM 2.1 hiera-b+ beside SAM ViT-B, both at 1024 input, in one run.

Each segmenter is loaded by the package's own builder (``load_segmenter``) and run through the
steps :class:`~regionspot_pl.backbones.encoder.RegionEncoder` takes (the host transform, then
``normalize_and_pad``, ``encode_images`` and ``decode`` on the device, at ``--precision auto``),
alternating image by image between the two so that outside load falls on both. Times: the image
encoder per image, and the prompt encoder + mask decoder (masks upsampled) per box, all of an
image's boxes in one call as extraction sends them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from regionspot_pl.backbones.build import load_segmenter
from regionspot_pl.backbones.common import autocast_for
from regionspot_pl.backbones.encoder import image_input
from regionspot_pl.backbones.image import read_image
from regionspot_pl.backbones.interfaces import PromptableSegmenter, Prompts
from regionspot_pl.data.records import ImageRecord

from .common import Table, now, sync


@dataclasses.dataclass(frozen=True)
class SegmenterCase:
    """One segmenter to time: its label, ``--sam_type`` and checkpoint (None: random weights)."""

    label: str
    sam_type: str
    checkpoint: Path | None


def segmenter_cases(paths: dict[str, Path], tiny: bool) -> list[SegmenterCase]:
    """(SAM, SAM 2.1) from bench-real's backbone files ``paths``: ViT-B from its random checkpoint
    and hiera-b+ built from the packaged config with random weights (speed does not depend on
    their values); ``tiny``: the tiny SAM and the tiny SAM 2.1 of ``write_tiny_backbones``."""
    if tiny:
        return [
            SegmenterCase("tiny SAM", "tiny", paths["sam_checkpoint"]),
            SegmenterCase("tiny SAM 2.1", str(paths["sam2_config"]), paths["sam2_checkpoint"]),
        ]
    return [
        SegmenterCase("SAM ViT-B@1024", "vit_b", paths["sam_checkpoint"]),
        SegmenterCase("SAM 2.1 hiera-b+@1024", "sam2.1_hiera_b+", None),
    ]


def _time_one(
    segmenter: PromptableSegmenter, pixels: np.ndarray, boxes: torch.Tensor, device: torch.device
) -> tuple[float, float, int]:
    """(image-encoder seconds, decoder seconds, embedding bytes) of one image and its boxes."""
    inputs = image_input(pixels, segmenter.transform)
    with torch.inference_mode(), autocast_for(device, "auto"):
        batch = segmenter.transform.normalize_and_pad(inputs.segmenter_image.to(device))[None]
        sync(device)
        start = now()
        embedding = segmenter.encode_images(batch)
        sync(device)
        encoded = now()
        prompts = Prompts(boxes=boxes).to(device).scaled(inputs.original_size, inputs.resized_size)
        segmenter.decode(embedding, [prompts], [inputs.resized_size])
        sync(device)
    return encoded - start, now() - encoded, embedding.numel() * embedding.element_size()


def bench_segmenters(
    table: Table, cases: list[SegmenterCase], records: list[ImageRecord], images: Path, device: torch.device
) -> None:
    """Encoder ms/image and decoder ms/box of each case on ``records`` (after one warm-up image),
    image by image in turn; one row each, the first case (SAM) the reference of the ratios."""
    segmenters = [load_segmenter(c.sam_type, c.checkpoint).to(device).eval() for c in cases]
    pictures = [read_image(images / r.file_name)[0] for r in records]
    boxes = [torch.as_tensor(r.boxes, dtype=torch.float32) for r in records]
    seconds, embedding_bytes = np.zeros((len(cases), 2)), [0] * len(cases)
    for i, (pixels, image_boxes) in enumerate(zip(pictures[:1] + pictures, boxes[:1] + boxes)):
        for j, segmenter in enumerate(segmenters):
            encode_s, decode_s, embedding_bytes[j] = _time_one(segmenter, pixels, image_boxes, device)
            if i > 0:  # the first pass, over the first image, warms up
                seconds[j] += (encode_s, decode_s)
    num_boxes = sum(len(b) for b in boxes)
    encoder_ms, decoder_ms = seconds[:, 0] * 1e3 / len(records), seconds[:, 1] * 1e3 / num_boxes
    for j, case in enumerate(cases):
        table.add(
            f"real segmenter ({device.type}): {case.label}, {len(records)} img / {num_boxes} boxes",
            f"encoder {encoder_ms[j]:.0f} ms/img, decoder {decoder_ms[j]:.1f} ms/box",
            f"{cases[0].label}: encoder {encoder_ms[0]:.0f} ms/img, decoder {decoder_ms[0]:.1f} ms/box",
            encoder_ms[0] / encoder_ms[j],
            ratio_fmt="{:.2f}x (encoder)",
            sam_type=case.sam_type,
            encoder_ms_per_image=encoder_ms[j],
            decoder_ms_per_box=decoder_ms[j],
            decoder_ratio=decoder_ms[0] / decoder_ms[j],
            boxes_per_image=num_boxes / len(records),
            embedding_bytes_per_image=embedding_bytes[j],
            region_token_bytes_per_image=segmenters[j].token_dim * 2 * num_boxes / len(records),
        )
