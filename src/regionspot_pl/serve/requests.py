"""A naming request, read and checked: its JSON body, the image within its limits, the prompts and
the vocabulary.

Every problem a client can cause raises :class:`RequestError` with the HTTP status to answer (400
malformed, 413 over a limit, 415 not an image) and a message naming the field and the fix, before
any model runs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..backbones.image import pil_to_rgb, resized_shape
from ..errors import RegionSpotError
from ..predict.prompts import read_vocabulary, region_prompts
from .settings import Limits

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class RequestError(RegionSpotError, ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NamingRequestBody(BaseModel):
    """The JSON body of ``POST /predict`` (types checked on arrival; values by :func:`read_request`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(description="base64 of a JPEG, PNG or WebP file (never a URL: the server fetches nothing)")
    boxes: list[list[float]] | None = Field(None, description="regions as boxes [[x1, y1, x2, y2], ...] in pixels")
    points: list[list[list[float]]] | None = Field(
        None, description="regions as points: per region a list of [x, y, label], label 1 foreground, 0 background"
    )
    vocabulary: list[str] | None = Field(None, description="class names")
    vocabulary_id: str | None = Field(None, description="the name of a vocabulary loaded at start (--vocabulary)")
    top_k: int = Field(5, ge=1, description="labels kept per region, best first")
    masks: bool = Field(False, description="add each region's mask as a COCO RLE")
    embeddings: bool = Field(False, description="add each region's embedding in CLIP's text space")


@dataclass
class NamingRequest:
    """A checked request: the image, its prompts, the class names and what to answer.

    ``image_key`` is the hash of the image file's bytes: equal bytes decode to equal pixels, so
    to equal features.
    """

    pixels: np.ndarray  # HxWx3 uint8 RGB
    image_key: str
    boxes: list[list[float]] | None
    point_coords: list[list[list[float]]] | None  # per region [K, 2]
    point_labels: list[list[float]] | None  # per region [K]
    vocabulary: list[str]
    loaded_vocabulary: bool  # from --vocabulary (its text embeddings may be written to the text cache)
    top_k: int = 5
    masks: bool = False
    embeddings: bool = False


def image_bytes(encoded: str) -> bytes:
    """The ``image`` field -> the file's bytes."""
    if encoded.lstrip()[:8].lower().startswith(("http://", "https://", "file:", "ftp:")):
        raise RequestError("image is a URL; send the file's bytes base64-encoded (the server fetches nothing)")
    try:  # line breaks are allowed, as `base64` writes them by default
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"image is not base64 ({err}); send the file's bytes base64-encoded") from None
    if not data:
        raise RequestError("image is empty; send a JPEG, PNG or WebP file's bytes base64-encoded")
    return data


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """A JPEG/PNG/WebP file -> HxWx3 uint8 RGB, EXIF orientation applied as ``read_image`` does.
    Its size is read from the header and refused before anything is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))  # reads the header only
    except Image.DecompressionBombError as err:  # Pillow's own bound, far above any --max_pixels default
        raise RequestError(f"image is too large to decode ({err})", 413) from None
    except Exception as err:  # Pillow raises many kinds for a file that is no image
        raise RequestError(f"image is not a JPEG, PNG or WebP file ({type(err).__name__}: {err})", 415) from None
    width, height = image.size
    if min(resized_shape(height, width)) < 2:  # the backbones' resizes would leave a side of 0 pixels
        raise RequestError(f"image is {width}x{height}: too elongated for the backbones; crop it nearer to square")
    if width * height > max_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; send a smaller"
            " image",
            413,
        )
    try:
        image.load()
    except Exception as err:
        raise RequestError(f"image is truncated or corrupt ({type(err).__name__}: {err})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block: orientation unknown, pixels as stored (as read_image does)
        pass
    return pil_to_rgb(image)


def request_vocabulary(body: NamingRequestBody, vocabularies: Mapping[str, list[str]], limits: Limits) -> list[str]:
    """The class names a body asks for: its ``vocabulary`` (checked) or the loaded ``vocabulary_id``."""
    if body.vocabulary is not None and body.vocabulary_id is not None:
        raise RequestError("give vocabulary or vocabulary_id, not both")
    if body.vocabulary_id is not None:
        if body.vocabulary_id not in vocabularies:
            raise RequestError(f"vocabulary_id {body.vocabulary_id!r} is not loaded; loaded: {sorted(vocabularies)}")
        return vocabularies[body.vocabulary_id]
    if body.vocabulary is None:
        raise RequestError("missing vocabulary: give vocabulary (a list of class names) or vocabulary_id")
    return check_vocabulary(body.vocabulary, limits)


def check_vocabulary(names: list[str], limits: Limits) -> list[str]:
    """The limits on a request's names, then the predictor's own check (none empty, none repeated)."""
    if len(names) > limits.max_vocabulary:
        raise RequestError(f"vocabulary has {len(names)} names, over the limit of {limits.max_vocabulary}", 413)
    long = next((i for i, name in enumerate(names) if len(name) > limits.max_name_length), None)
    if long is not None:
        raise RequestError(
            f"vocabulary[{long}] has {len(names[long])} characters, over the limit of {limits.max_name_length}"
        )
    try:
        return read_vocabulary(names)
    except RegionSpotError as err:
        raise RequestError(str(err)) from None


def split_points(points: list[list[list[float]]], limits: Limits) -> tuple[list, list]:
    """Per region [[x, y, label], ...] -> (per region [[x, y], ...], per region [label, ...])."""
    coords, labels = [], []
    for r, region in enumerate(points):
        if not region:
            raise RequestError(f"points[{r}] is empty; give at least one [x, y, label]")
        if len(region) > limits.max_points:
            raise RequestError(f"points[{r}] has {len(region)} points, over the limit of {limits.max_points}", 413)
        for i, point in enumerate(region):
            if len(point) != 3:
                raise RequestError(f"points[{r}][{i}] is {point!r}; each point is [x, y, label]")
        coords.append([p[:2] for p in region])
        labels.append([p[2] for p in region])
    return coords, labels


def read_request(body: NamingRequestBody, vocabularies: Mapping[str, list[str]], limits: Limits) -> NamingRequest:
    """A typed body -> a checked :class:`NamingRequest`, the prompts checked against the image as
    the predictor checks them. The image is decoded last, after every check that does not need it."""
    names = request_vocabulary(body, vocabularies, limits)
    if body.boxes is None and body.points is None:
        raise RequestError("missing prompts: give boxes [[x1, y1, x2, y2], ...] and/or points")
    regions = max(len(body.boxes or []), len(body.points or []))
    if regions > limits.max_regions:
        raise RequestError(f"{regions} regions, over the limit of {limits.max_regions} a request", 413)
    coords, labels = split_points(body.points, limits) if body.points is not None else (None, None)
    data = image_bytes(body.image)
    pixels = decode_image(data, limits.max_pixels)
    try:
        prompts = region_prompts(body.boxes, coords, labels, pixels.shape[:2])
    except RegionSpotError as err:
        raise RequestError(str(err)) from None
    if not prompts:
        raise RequestError("no regions: boxes and points are both empty")
    return NamingRequest(
        pixels, hashlib.sha256(data).hexdigest(), body.boxes, coords, labels, names,
        body.vocabulary_id is not None, body.top_k, body.masks, body.embeddings,
    )  # fmt: skip
