"""The request -> answer path in process: a second prompt round on an image runs neither image
encoder (counted on the real encoder object), the caches stay within their bounds, a batch's new
images are encoded together and its requests are answered as the Predictor answers them, a bad
request fails only itself, and a request's own words never reach the text-cache file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from serving import b64, check_answer
from tolerances import assert_close_across_batching

from regionspot_pl.serve.engine import NamingEngine
from regionspot_pl.serve.requests import NamingRequest, NamingRequestBody, RequestError, read_request
from regionspot_pl.serve.settings import Limits

WORDS = ["red solid circle", "green solid square", "blue solid triangle", "yellow solid star", "white hexagon"]
BOXES = [[103.0, 131.0, 189.0, 214.0], [114.0, 156.0, 170.0, 215.0], [10.0, 20.0, 120.0, 90.0]]
CLIP_K = 256  # the tiny CLIP's longest reduction (its MLP's hidden width)


class Counter:
    """Wraps a bound method of the real encoder and counts its calls (the method still runs)."""

    def __init__(self, method):
        self.method, self.calls, self.sizes = method, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.sizes.append(len(args[0]))
        return self.method(*args, **kwargs)


@pytest.fixture(scope="module")
def images(demo_data):
    return sorted(demo_data["val_images"].glob("*.jpg"))[:4]


def request(image, boxes=BOXES[:1], vocabulary=WORDS, vocabularies=None, **fields) -> NamingRequest:
    body = NamingRequestBody(image=b64(image), boxes=boxes, vocabulary=vocabulary, **fields)
    return read_request(body, vocabularies or {}, Limits())


@pytest.fixture
def counted(predictor, monkeypatch):
    """Counters on the session predictor's encoder: SAM's image encoder, CLIP's feature map and
    text encoder, and the encoder's ``embed`` (a NamingEngine shares that encoder object)."""
    encoder = predictor.encoder
    counters = {
        "sam": Counter(encoder.segmenter.encode_images),
        "clip": Counter(encoder.vlm.feature_map),
        "texts": Counter(encoder.vlm.encode_texts),
        "embed": Counter(encoder.embed),
    }
    for owner, name, key in [(encoder.segmenter, "encode_images", "sam"), (encoder.vlm, "feature_map", "clip"),
                             (encoder.vlm, "encode_texts", "texts"), (encoder, "embed", "embed")]:  # fmt: skip
        monkeypatch.setattr(owner, name, counters[key])
    return counters


def calls(counters, *names):
    return [counters[n].calls for n in names]


def test_a_second_round_runs_neither_image_encoder(predictor, images, counted):
    engine = NamingEngine(predictor, image_cache=2, text_cache_entries=2)
    words = [*WORDS, "a word no other test uses"]
    engine.answer(request(images[0], BOXES[:1], words))
    assert calls(counted, "sam", "clip", "texts") == [1, 1, 1]
    second = engine.answer(request(images[0], BOXES[1:], words))
    assert calls(counted, "sam", "clip", "texts") == [1, 1, 1]  # neither image encoder, no text encoder
    engine.answer(request(images[1], BOXES[:1], words))
    engine.answer(request(images[2], BOXES[:1], words))  # drops the oldest image: images[0]
    assert calls(counted, "sam", "clip", "texts") == [3, 3, 1]
    engine.answer(request(images[0], BOXES[:1], words))
    assert calls(counted, "sam", "clip") == [4, 4] and len(engine.images) == 2
    # the second round's answer is the Predictor's on the same image
    predictor.set_image(images[0])
    check_answer(second["regions"], predictor.predict(BOXES[1:], words))


def test_text_memory_is_bounded_and_a_requests_words_are_never_written(predictor, images, counted, tmp_path):
    engine = NamingEngine(predictor, vocabularies={"shapes": WORDS}, text_cache_entries=2)
    engine.predictor.text_cache = tmp_path / "text.h5"
    for k in range(4):
        engine.answer(request(images[0], vocabulary=[f"class {k} {i}" for i in range(3)]))
    assert len(engine.texts) == 2 and counted["texts"].calls == 4
    assert not (tmp_path / "text.h5").exists()  # a client's words never grow the file
    body = NamingRequestBody(image=b64(images[0]), boxes=BOXES[:1], vocabulary_id="shapes")
    loaded = engine.answer(read_request(body, engine.vocabularies, Limits()))
    with h5py.File(tmp_path / "text.h5") as cache:  # a loaded vocabulary goes through the text cache
        names = [list(g["class_names"].asstr()) for model in cache.values() for g in model.values()]
    assert names == [WORDS]
    predictor.set_image(images[0])
    check_answer(loaded["regions"], predictor.predict(BOXES[:1], WORDS))


def test_a_batch_encodes_its_new_images_together_and_answers_each_request(predictor, images, counted):
    engine = NamingEngine(predictor, image_cache=4)
    batch = [
        request(images[0], BOXES, masks=True, embeddings=True),
        RequestError("refused on arrival", 413),
        request(images[1], BOXES[1:], top_k=2),
        request(images[0], BOXES[:1]),
    ]
    broken = request(images[1], BOXES[:1])
    broken.boxes = [[5.0, 5.0, 1.0, 1.0]]  # past read_request's check: the predictor refuses it
    answers = engine.answer_all([*batch, broken])
    assert counted["embed"].sizes == [2]  # one encoder call for the two new images
    assert isinstance(answers[1], RequestError) and answers[1].status == 413
    assert isinstance(answers[4], RequestError) and answers[4].status == 400 and "box 0" in str(answers[4])
    for answer, sent in [(answers[0], batch[0]), (answers[2], batch[2]), (answers[3], batch[3])]:
        # the answer is the Predictor's on the features the batch computed ...
        features = engine.images[sent.image_key]
        predictor.set_image(sent.pixels, features)
        embeddings = predictor.region_embeddings(sent.boxes) if sent.embeddings else None
        check_answer(answer["regions"], predictor.predict(sent.boxes, WORDS, topk=sent.top_k), embeddings)
        # ... which are the image's own, up to the batching of CLIP's float32 path
        alone = predictor.encoder.embed([predictor.encoder.image_input(sent.pixels)])[0]
        torch.testing.assert_close(features.embedding, alone.embedding, rtol=0, atol=0)  # SAM: one image a call
        assert_close_across_batching(features.image_tokens.float(), alone.image_tokens.float(), CLIP_K, True)
    assert [len(a["regions"]) for a in (answers[0], answers[2], answers[3])] == [3, 2, 1]
    assert all(len(r["labels"]) == 2 for r in answers[2]["regions"]) and "mask" in answers[0]["regions"][0]


def test_points_and_boxes_with_points(predictor, images):
    engine = NamingEngine(predictor)
    points = [[[150.0, 170.0, 1.0]], [[140.0, 180.0, 1.0], [20.0, 20.0, 0.0]]]
    for boxes in (None, BOXES[:2]):
        answer = engine.answer(request(images[1], boxes, points=points, masks=True))
        predictor.set_image(images[1])
        coords = [[p[:2] for p in region] for region in points]
        labels = [[p[2] for p in region] for region in points]
        check_answer(answer["regions"], predictor.predict(boxes, WORDS, point_coords=coords, point_labels=labels))
        mask = predictor.predict(boxes, WORDS, point_coords=coords, point_labels=labels)[0]["mask"]
        if boxes is None and mask.any():  # the box of a points-only region is the box around its mask
            rows, cols = np.nonzero(mask)
            assert answer["regions"][0]["box"] == [cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0]
