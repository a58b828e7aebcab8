"""The one image path both frozen backbones see, as RegionSpot's reference inference runs it.

1. Read as detectron2 reads: EXIF orientation applied, RGB, uint8 (``read_image``).
2. Resize with detectron2's test transform ``ResizeShortestEdge(800, max_size=1333)``: PIL
   bilinear, its rounding (``resized_shape``, ``resize_for_backbones``).
3. SAM and CLIP both take that resized image; boxes and points are scaled into it
   (``scale_boxes``, ``scale_points``) and SAM's masks, thresholded at the resized size, come
   back to the original size by nearest-neighbour upsampling (``masks_to_original``).

:class:`~regionspot_pl.backbones.encoder.RegionEncoder` runs these steps for extraction and the
predictor, so one image gives the same features whichever command computed them. Boxes stay in
original pixels everywhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F

from ..errors import RegionSpotError

# detectron2's test-time ResizeShortestEdge of the reference's configs.
SHORT_EDGE = 800
MAX_SIZE = 1333

# Pillow modes holding more than 8 bits per pixel; convert("RGB") clips them, which turns a
# 16-bit PNG into an all-white image, so they are rescaled to 8 bits first.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageReadError(RegionSpotError, ValueError):
    """An image file is missing, unreadable, outside its folder, or not the size its record says."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file does not exist."""


class ImageSizeError(ImageReadError):
    """An image decodes, but neither its oriented nor its stored pixels have its record's size."""


def resolve_image_path(root: str | Path, file_name: str) -> Path:
    """``root / file_name``, refusing any name that leads outside ``root`` (``..``, absolute
    paths, symlinks pointing out), so an annotation file can never make us read other files."""
    if not isinstance(file_name, str) or not file_name:
        raise ImageReadError(f"image file name must be a non-empty string, got {file_name!r}")
    base = Path(root).resolve()
    path = (base / file_name).resolve()
    if path != base and base not in path.parents:
        raise ImageReadError(
            f"image file name {file_name!r} points outside the image folder {root}; file names "
            "must be relative paths inside --images"
        )
    return path


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> HxWx3 uint8 RGB. 16/32-bit integer modes are scaled from their
    16-bit range to 8 bits (x * 255 / 65535, rounded) instead of being clipped to white."""
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image).astype(np.int64)
        gray = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    return np.asarray(image.convert("RGB")).copy()


def _oriented(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, as detectron2's ``read_image`` does; a corrupt EXIF block
    leaves the image as stored (detectron2 ignores it too)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF in the wild: orientation unknown, keep the pixels
        return image


def read_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """Decode an image file as the reference does: EXIF orientation applied, RGB, uint8.

    Args:
        path: the image file.
        expected_size: (H, W) the annotation gives, or None. When the EXIF-oriented image does
            not have that size but the raw pixel array does (annotations made from the raw
            array), the raw array is used.

    Returns:
        (HxWx3 uint8 RGB array, raw) with ``raw`` True when the EXIF orientation was ignored to
        match ``expected_size`` (callers count these).

    Raises:
        ImageReadError: missing or undecodable file, or neither orientation has ``expected_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as stored:
            stored.load()
            oriented = _oriented(stored)
            raw_hw = (stored.height, stored.width)
            if expected_size is None or (oriented.height, oriented.width) == tuple(expected_size):
                return pil_to_rgb(oriented), False
            if raw_hw == tuple(expected_size):
                return pil_to_rgb(stored), True
            got = (oriented.height, oriented.width)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"image {path} could not be decoded ({type(err).__name__}: {err})") from err
    raise ImageSizeError(
        f"image {path} is {got[1]}x{got[0]} (W x H, EXIF orientation applied; stored "
        f"{raw_hw[1]}x{raw_hw[0]}) but its record says {expected_size[1]}x{expected_size[0]}: "
        "boxes would be misplaced; fix the annotation's width/height or the image folder"
    )


def check_rgb_uint8(image: np.ndarray, model: str) -> None:
    """Refuse anything but an HxWx3 uint8 RGB array as ``model``'s input (``model`` names it in
    the error): a float or single-channel array would otherwise be scaled or broadcast silently."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"{model} preprocess expects an HxWx3 RGB numpy array, got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{model} preprocess expects uint8 pixels in [0, 255], got {image.dtype}; "
            "read images with regionspot_pl.backbones.image.read_image"
        )


def resized_shape(height: int, width: int, short_edge: int = SHORT_EDGE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(h, w) of detectron2's ``ResizeShortestEdge.get_output_shape`` for an (H, W) image.

    The short side becomes ``short_edge``; if the long side then exceeds ``max_size`` both
    shrink by the same factor; each side is rounded with ``int(x + 0.5)``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (H x W)")
    scale = short_edge * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = short_edge * 1.0, scale * width
    else:
        new_h, new_w = scale * height, short_edge * 1.0
    if max(new_h, new_w) > max_size:
        shrink = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_for_backbones(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> the resized image both backbones take, hxwx3 uint8 (PIL bilinear,
    as detectron2's ``ResizeTransform`` resizes uint8 images)."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 RGB array, got {getattr(image, 'shape', type(image).__name__)}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    new_h, new_w = resized_shape(image.shape[0], image.shape[1])
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.array(resized)  # writable: torch.from_numpy shares it


def scale_boxes(boxes: Tensor, original_size: tuple[int, int], resized_size: tuple[int, int]) -> Tensor:
    """[N, 4] xyxy boxes in original pixels -> the same boxes in the resized image's pixels,
    scaled by (w / W, h / H) as detectron2's transform scales coordinates."""
    (height, width), (new_h, new_w) = original_size, resized_size
    factors = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height], dtype=torch.float64)
    return (boxes.to(torch.float64) * factors.to(boxes.device)).to(torch.float32)


def scale_points(points: Tensor, original_size: tuple[int, int], resized_size: tuple[int, int]) -> Tensor:
    """[..., 2] x, y in original pixels -> the resized image's pixels, scaled by (w / W, h / H)
    as ``scale_boxes`` scales box corners."""
    (height, width), (new_h, new_w) = original_size, resized_size
    factors = torch.tensor([new_w / width, new_h / height], dtype=torch.float64)
    return (points.to(torch.float64) * factors.to(points.device)).to(torch.float32)


def masks_to_original(masks: Tensor, original_size: tuple[int, int]) -> Tensor:
    """[N, h, w] bool masks at the resized size -> [N, H, W] bool, nearest-neighbour as the
    reference's post-processing (``F.interpolate(mode="nearest")``). Interpolated as uint8, not
    float: the same pixels at a quarter of the memory traffic, which is what bounds it on a CPU."""
    if masks.shape[-2:] == tuple(original_size):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *original_size))
    up = F.interpolate(masks[:, None].to(torch.uint8), size=tuple(original_size), mode="nearest")
    return up[:, 0].bool()
