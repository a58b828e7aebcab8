"""One encode path: extraction's shards and the predictor's features come from the same
RegionEncoder, and its IoU is SamPredictor's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from torch.utils.data import DataLoader

from regionspot_pl.backbones import ClipEncoder, Prompts, RegionEncoder, SamSegmenter, build_sam, load_clip
from regionspot_pl.cache.shards import iter_samples, list_shards
from regionspot_pl.data.records import load_coco
from regionspot_pl.extract.features import ImageFeaturesInput
from regionspot_pl.extract.run import ExtractConfig, load_extractor, run_extraction
from regionspot_pl.predict.predictor import PROMPTS_PER_CALL
from regionspot_pl.predict.prompts import region_prompts

NUM_IMAGES = 3


@pytest.fixture(scope="module")
def extracted(demo_data, tiny_backbones, predictor, tmp_path_factory) -> dict:
    """Shards of the first val images (masks stored), one image per encoder batch so that each
    image's boxes go through the decoder as the predictor sends them; the extractor and a
    predictor on the same backbones."""
    root = tmp_path_factory.mktemp("encoder")
    cfg = ExtractConfig(
        images=str(demo_data["val_images"]), annotations=str(demo_data["val_json"]), out=str(root / "shards"),
        sam_type="tiny", sam_checkpoint=str(tiny_backbones["sam_checkpoint"]),
        clip_model=str(tiny_backbones["clip_dir"]), workers=0, batch_size=1, limit=NUM_IMAGES,
        text_cache=str(root / "text.h5"),
    )  # fmt: skip
    run_extraction(cfg)
    samples = {int(s["meta"]["image_id"]): s for s in iter_samples(list_shards(root / "shards"))}
    return {"cfg": cfg, "samples": samples, "extractor": load_extractor(cfg), "predictor": predictor}


def _stored_masks(sample: dict) -> np.ndarray:
    return mask_utils.decode(sample["meta"]["masks"]).transpose(2, 0, 1).astype(bool)


def test_shards_and_predictor_hold_the_same_features(extracted):
    """The same image and boxes: the shard's SAM tokens, masks and CLIP tokens equal the
    predictor's, and the extractor's IoUs equal the predictor's, bit for bit."""
    cfg, samples, extractor, predictor = (extracted[k] for k in ("cfg", "samples", "extractor", "predictor"))
    records = [r for r in load_coco(cfg.annotations)[0] if r.image_id in samples]
    assert len(records) == len(samples) == NUM_IMAGES
    dataset = ImageFeaturesInput([(0, r) for r in records], cfg.images, extractor.encoder.segmenter.transform)
    for i, rec in enumerate(records):
        sample = samples[rec.image_id]
        (encoded,) = extractor.encode([dataset[i]])
        np.testing.assert_array_equal(sample["sam"], encoded.regions.tokens.numpy())
        np.testing.assert_array_equal(sample["clip"], encoded.image_tokens.numpy())

        predictor.set_image(Path(cfg.images) / rec.file_name)
        assert len(rec.boxes) <= PROMPTS_PER_CALL  # one decoder call in both, as in extraction
        prompts = region_prompts(sample["boxes"], None, None, predictor.image_size)
        tokens, masks, iou = predictor._prompt_tokens(prompts)
        np.testing.assert_array_equal(sample["sam"].astype(np.float32), tokens.numpy())
        np.testing.assert_array_equal(_stored_masks(sample), masks.numpy())
        assert masks.any()  # not vacuous
        np.testing.assert_array_equal(sample["clip"], predictor._features.image_tokens.numpy())
        torch.testing.assert_close(iou, encoded.regions.iou, rtol=0, atol=0)
        assert iou.shape == (len(rec.boxes),) and iou.dtype == torch.float32


@pytest.fixture(scope="module")
def encoder(tiny_backbones) -> RegionEncoder:
    segmenter = SamSegmenter(build_sam("tiny", tiny_backbones["sam_checkpoint"]))
    return RegionEncoder(segmenter, ClipEncoder(*load_clip(tiny_backbones["clip_dir"])))


def test_iou_is_sam_predictors(encoder):
    """An image of detectron2's own size (800 x 1024: the resize keeps it) at SAM's scale 1/2 of
    the tiny SAM's 512 input: each box reaches the decoder as SamPredictor.predict puts it there,
    so IoU, token and mask are SamPredictor's exactly."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (800, 1024, 3), dtype=np.uint8)
    image[200:600, 300:700] = (200, 40, 30)  # an object, so masks are not pure noise
    inputs = encoder.image_input(image)
    assert inputs.resized_size == inputs.original_size == (800, 1024)
    reference = SamPredictor(encoder.segmenter.sam)
    reference.set_image(image)
    captured = []
    transformer = encoder.segmenter.sam.mask_decoder.transformer
    hook = transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        for box in ([300.0, 200.0, 700.0, 600.0], [10.0, 20.0, 1000.0, 790.0], [512.0, 64.0, 600.0, 128.0]):
            masks, iou, _ = reference.predict(box=np.array(box), multimask_output=False)
            (encoded,) = encoder.encode([inputs], [Prompts(boxes=torch.tensor([box]))])
            regions = encoded.regions
            assert regions.iou.shape == (1,) and regions.iou.dtype == torch.float32
            torch.testing.assert_close(regions.iou, torch.from_numpy(iou), rtol=0, atol=0)
            torch.testing.assert_close(regions.tokens, captured[0][:, 1].half(), rtol=0, atol=0)
            assert torch.equal(regions.masks, torch.from_numpy(masks))
            captured.clear()
    finally:
        hook.remove()


def test_stages_compose_to_encode(encoder):
    """embed then decode (the predictor's calls) is encode (extraction's call); points with
    multimask come back at the original size."""
    image = np.random.default_rng(1).integers(0, 256, (150, 220, 3), dtype=np.uint8)
    inputs = [encoder.image_input(image), encoder.image_input(np.ascontiguousarray(image[::-1]))]
    points = Prompts(point_coords=torch.tensor([[[50.0, 60.0]], [[100.0, 20.0]]]), point_labels=torch.ones(2, 1))
    encoded = encoder.encode(inputs, [points, points], multimask_output=True)
    features = encoder.embed(inputs)
    decoded = encoder.decode(features, [points, points], multimask_output=True)
    for one, image_features, regions in zip(encoded, features, decoded):
        assert one.regions.tokens.shape == (2, 3, 256) and one.regions.tokens.dtype == torch.float16
        assert one.regions.masks.shape == (2, 3, 150, 220) and one.regions.iou.shape == (2, 3)
        assert one.image_tokens.shape == (197, 128) and one.image_tokens.dtype == torch.float16
        torch.testing.assert_close(one.image_tokens, image_features.image_tokens, rtol=0, atol=0)
        torch.testing.assert_close(one.regions.tokens, regions.tokens, rtol=0, atol=0)
        torch.testing.assert_close(one.regions.iou, regions.iou, rtol=0, atol=0)
        assert torch.equal(one.regions.masks, regions.masks)
    with pytest.raises(ValueError, match="2 images but 1 prompt sets"):
        encoder.decode(features, [points])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a GPU")
def test_loader_pins_the_image_inputs(demo_data, tiny_backbones, encoder):
    records = load_coco(demo_data["val_json"])[0][:2]
    dataset = ImageFeaturesInput([(0, r) for r in records], str(demo_data["val_images"]), encoder.segmenter.transform)
    loader = DataLoader(dataset, batch_size=2, collate_fn=lambda items: items, pin_memory=True)
    for item in next(iter(loader)):
        assert item["input"].segmenter_image.is_pinned() and item["input"].vlm_image.is_pinned()
