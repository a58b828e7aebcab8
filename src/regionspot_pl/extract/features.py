"""Extraction's two halves around the region encoder: :class:`ImageFeaturesInput` reads and
resizes images in DataLoader workers; :class:`FeatureExtractor` runs
:class:`~regionspot_pl.backbones.encoder.RegionEncoder` on a batch of them and turns its output
into shard samples."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..backbones.encoder import EncodedImage, RegionEncoder, image_input
from ..backbones.image import ImageReadError, ImageSizeError, read_image, resolve_image_path
from ..backbones.interfaces import Prompts, SegmenterTransform
from ..cache.shards import encode_sample
from ..data.records import ImageRecord
from ..utils.io import masks_to_rle


class ImageFeaturesInput(Dataset):
    """Decodes and resizes images for both models, inside DataLoader workers.

    Each image is read (EXIF applied) and made an :class:`~regionspot_pl.backbones.encoder.ImageInput`
    (detectron2's test resize, then the segmenter's own resize, both uint8). Holds only plain
    data and the segmenter's weight-free transform, so it is cheap to send to workers.
    """

    def __init__(self, records: list[tuple[int, ImageRecord]], image_dir: str, segmenter_transform: SegmenterTransform):
        self.records = records
        self.image_dir = Path(image_dir)
        self.segmenter_transform = segmenter_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        shard, rec = self.records[i]
        item = {"shard": shard, "record": rec}
        try:  # missing, truncated or wrong size: logged and counted by reason, not fatal
            item["reason"] = "outside_images"  # a symlink leading out (names with '..' never get here)
            path = resolve_image_path(self.image_dir, rec.file_name)
            item["reason"] = "missing"
            if not path.is_file():
                raise ImageReadError(f"image file not found: {path}")
            item["reason"] = "undecodable"
            image, item["raw_orientation"] = read_image(path, (rec.height, rec.width))
        except ImageReadError as err:
            item["error"] = str(err)
            if isinstance(err, ImageSizeError):
                item["reason"] = "size_mismatch"
            return item
        del item["reason"]
        item["input"] = image_input(image, self.segmenter_transform)
        return item


class FeatureExtractor:
    """The region encoder (frozen SAM + CLIP on a device) turned to shards: a batch of prepared
    images -> their features (``encode``, device work) -> webdataset samples (``samples``, host
    work)."""

    def __init__(self, encoder: RegionEncoder, with_masks: bool = True) -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.with_masks = with_masks  # evaluation splits store masks (mask AP), training sets do not

    def encode(self, items: list[dict]) -> list[EncodedImage]:
        """Prepared items -> per image, in order, the encoder's output for its boxes: region
        tokens [N, 256] float16, CLIP tokens [T, D] float16, masks [N, H, W] bool at the
        original size (None when masks are not stored), predicted IoU [N] float32, on the device."""
        # all boxes of the batch go through SAM's decoder together: one call per image would
        # leave a GPU waiting on launches (equal results, tests/backbones/test_backbones.py)
        prompts = [Prompts(boxes=torch.from_numpy(it["record"].boxes)) for it in items]
        return self.encoder.encode([it["input"] for it in items], prompts, with_masks=self.with_masks)

    def __call__(self, items: list[dict], dataset: str) -> list[dict]:
        """Prepared items (no errors) -> encoded webdataset samples, in the same order."""
        return self.samples(items, self.encode(items), dataset)

    def samples(self, items: list[dict], encoded: list[EncodedImage], dataset: str) -> list[dict]:
        """``encode``'s output -> webdataset samples (to the host, mask RLE, serialising): host
        work only, so it can run beside the next batch's device work."""
        samples = []
        for it, out in zip(items, encoded):
            rec: ImageRecord = it["record"]
            meta = {"file_name": rec.file_name, "width": rec.width, "height": rec.height, "dataset": dataset}
            if self.with_masks:
                meta["masks"] = masks_to_rle(out.regions.masks)
            tokens, clip_tokens = out.regions.tokens.cpu().numpy(), out.image_tokens.cpu().numpy()
            iou = out.regions.iou.cpu().numpy()
            samples.append(
                encode_sample(rec.image_id, tokens, rec.boxes, rec.labels, rec.scores, clip_tokens, meta, iou=iou)
            )
        return samples
