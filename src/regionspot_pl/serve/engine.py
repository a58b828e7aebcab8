"""The one request -> answer path of the server and the web page.

:class:`NamingEngine` answers a batch of :class:`~.requests.NamingRequest` s with one
:class:`~regionspot_pl.predict.predictor.Predictor`: the images of the batch not seen recently are
encoded together (``RegionEncoder.embed``), then each request is ``Predictor.set_image`` (with
those features) + ``predict`` on its own, so the regions of one request attend to each other in
the head and never to another request's. Image features are kept per image (by the hash of its
file) and text embeddings per vocabulary, both in bounded LRU caches: a second round of prompts
on a recent image runs neither image encoder.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.clip import text_embeddings
from ..backbones.common import resolve_device
from ..backbones.encoder import ImageFeatures
from ..backbones.templates import TEMPLATES
from ..errors import RegionSpotError
from ..predict.predictor import Predictor
from ..predict.prompts import read_vocabulary
from ..predict.results import region_box
from ..utils.io import masks_to_rle
from .caches import LRUCache
from .requests import NamingRequest, RequestError
from .settings import ServeConfig, ServeConfigError

logger = logging.getLogger(__name__)

Answer = dict[str, Any]


class NamingEngine:
    """Names the regions of checked requests with one set of models.

    Args:
        models: a Predictor whose head and encoder are used (its image and text memory are not).
        vocabularies: named vocabularies a request may choose by ``vocabulary_id``.
        image_cache: images whose features are kept.
        text_cache_entries: vocabularies whose text embeddings are kept in memory.
    """

    def __init__(
        self,
        models: Predictor,
        vocabularies: Mapping[str, list[str]] | None = None,
        image_cache: int = 16,
        text_cache_entries: int = 16,
    ) -> None:
        self.vocabularies = dict(vocabularies or {})
        self.images: LRUCache = LRUCache(image_cache)  # image key -> ImageFeatures
        self.texts: LRUCache = LRUCache(text_cache_entries)  # tuple of names -> [C, text_dim]
        self.predictor = Predictor(models.head, models.encoder, models.clip_id, models.text_cache, texts=self.texts)
        self._lock = threading.Lock()  # one batch at a time (the page calls from several threads)

    @classmethod
    def from_settings(cls, config: ServeConfig, device: str | None = None) -> NamingEngine:
        """Load the models and the ``--vocabulary`` files of ``config`` (on ``device``, else the
        settings' device)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the log is for requests
        vocabularies = load_vocabularies(config)
        models = Predictor.from_pretrained(
            config.head, config.sam_type, config.sam_checkpoint, config.clip_model,
            device=device or str(resolve_device(config.device)), text_cache=config.text_cache,
            precision=config.precision,
        )  # fmt: skip
        return cls(models, vocabularies, config.image_cache, config.text_cache_entries)

    # ------------------------------------------------------------------------------ answering
    def answer_all(self, requests: Sequence[NamingRequest | RequestError]) -> list[Answer | RequestError]:
        """One answer per request, in order: ``{"regions": [...]}`` (see :meth:`answer`) or the
        refusal. A request that fails never fails the others."""
        with self._lock:
            features = self._features([r for r in requests if isinstance(r, NamingRequest)])
            return [self._answer_or_refusal(r, features) for r in requests]

    def answer(self, request: NamingRequest) -> Answer:
        """``{"regions": [...]}``, one per region in request order: ``box`` (the prompt box, else
        the box around the mask), ``labels`` and ``scores`` (top-k, best first, softmax over the
        whole vocabulary), ``iou`` (SAM's predicted IoU); ``mask`` (COCO RLE) and ``embedding``
        ([text_dim], L2-normalized) when asked. Raises the request's error."""
        (answer,) = self.answer_all([request])
        if isinstance(answer, RequestError):
            raise answer
        return answer

    def _answer_or_refusal(
        self, request: NamingRequest | RequestError, features: Mapping[str, ImageFeatures | RequestError]
    ) -> Answer | RequestError:
        if isinstance(request, RequestError):
            return request
        image = features[request.image_key]
        if isinstance(image, RequestError):
            return image
        try:
            return self._name(request, image)
        except RegionSpotError as err:  # what the predictor refuses
            return RequestError(str(err))
        except Exception:  # a fault of ours: this request fails, the others go on
            logger.exception("naming a request failed")
            return RequestError("internal error while naming the regions (the server's log has the details)", 500)

    def _name(self, request: NamingRequest, features: ImageFeatures) -> Answer:
        self._remember_texts(request.vocabulary, request.loaded_vocabulary)
        predictor = self.predictor
        predictor.set_image(request.pixels, features)
        prompts = {"point_coords": request.point_coords, "point_labels": request.point_labels}
        results = predictor.predict(
            request.boxes, request.vocabulary, topk=request.top_k, return_embeddings=request.embeddings, **prompts
        )
        regions = [
            {"box": region_box(r), "labels": r["labels"], "scores": r["scores"], "iou": r["iou"]} for r in results
        ]
        if request.masks:
            for region, rle in zip(regions, masks_to_rle(np.stack([r["mask"] for r in results]))):
                region["mask"] = rle
        if request.embeddings:
            for region, result in zip(regions, results):
                region["embedding"] = result["embedding"].tolist()
        return {"regions": regions}

    # -------------------------------------------------------------------------------- memory
    def _features(self, requests: Sequence[NamingRequest]) -> dict[str, ImageFeatures | RequestError]:
        """Each distinct image of the requests -> its features: kept ones as they are, the others
        encoded together in one ``embed`` call (one at a time if that call fails, so that one bad
        image fails only its own requests)."""
        found: dict[str, ImageFeatures | RequestError] = {}
        new: dict[str, NamingRequest] = {}
        for request in requests:
            if request.image_key in self.images:
                found[request.image_key] = self.images[request.image_key]
            else:
                new.setdefault(request.image_key, request)
        encoder = self.predictor.encoder
        try:
            encoded = encoder.embed([encoder.image_input(r.pixels) for r in new.values()])
        except Exception:
            logger.exception("encoding %d images together failed; encoding them one by one", len(new))
            encoded = [self._embed_one(r) for r in new.values()]
        for key, image in zip(new, encoded):
            found[key] = image
            if isinstance(image, ImageFeatures):
                self.images[key] = image
        return found

    def _embed_one(self, request: NamingRequest) -> ImageFeatures | RequestError:
        encoder = self.predictor.encoder
        try:
            return encoder.embed([encoder.image_input(request.pixels)])[0]
        except Exception:
            logger.exception("encoding an image failed")
            return RequestError("internal error while encoding the image (the server's log has the details)", 500)

    def _remember_texts(self, names: list[str], loaded: bool) -> None:
        """Put the vocabulary's text embeddings where the predictor reads them. A loaded vocabulary's
        go through the HDF5 text cache (``text_embeddings``, as every command's do); a request's own
        words are encoded in memory only, so that no client can grow that file."""
        key = tuple(names)
        if key in self.texts:
            self.texts.move_to_end(key)
            return
        vlm = self.predictor.encoder.vlm
        if loaded:
            self.texts[key] = text_embeddings(vlm, names, self.predictor.text_cache, self.predictor.clip_id)
        else:
            self.texts[key] = vlm.encode_texts(names, TEMPLATES).float().cpu()


def load_vocabularies(config: ServeConfig) -> dict[str, list[str]]:
    """The ``--vocabulary NAME=FILE`` files, read and checked (the operator's choice: the request
    limits do not apply to them)."""
    vocabularies = {}
    for name, file in config.vocabulary_files().items():
        try:
            vocabularies[name] = read_vocabulary(Path(file))
        except RegionSpotError as err:
            raise ServeConfigError(f"--vocabulary {name}={file}: {err}") from None
    return vocabularies


def check_before_start(config: ServeConfig) -> None:
    """What can be checked before any worker starts: the files, the vocabularies, the port."""
    for flag, path in (("--sam_checkpoint", config.sam_checkpoint), ("--clip_model", config.clip_model)):
        if not Path(path).exists():
            raise ServeConfigError(f"{flag} {path} does not exist; give the path of the file or folder")
    load_vocabularies(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as err:
            raise ServeConfigError(
                f"--port {config.port} on {config.host} cannot be used ({err}); pick another"
            ) from None
