"""The predictor's inputs, checked: an image, a vocabulary, and region prompts in pixels of the
original image (boxes, points with labels, or both, as SAM takes them).

Bad input a user can give (an unreadable image, a box outside it, malformed points, an empty
vocabulary) raises a :class:`~regionspot_pl.errors.RegionSpotError` subclass naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..backbones.image import ImageReadError, pil_to_rgb, read_image
from ..backbones.interfaces import Prompts
from ..errors import RegionSpotError


class PromptError(RegionSpotError, ValueError):
    """A region prompt is malformed: a box or point outside the image, not numbers, or counts
    that do not agree."""


class VocabularyError(RegionSpotError, ValueError):
    """A vocabulary is missing, empty, or repeats a class name."""


ImageLike = str | Path | Image.Image | np.ndarray
BoxesLike = Sequence[Sequence[float]] | np.ndarray | Tensor
# [K, 2] one region's points; [N, K, 2] N regions; or a list of N [K_i, 2] arrays
PointsLike = Sequence[Any] | np.ndarray | Tensor
VocabularyLike = Sequence[str] | str | Path

# Boxes from annotation files are floats that may end a rounding error past the border.
_BORDER_TOLERANCE = 1e-3


def load_image(image: ImageLike) -> np.ndarray:
    """A path, PIL image or HxWx3 uint8 array -> HxWx3 uint8 RGB array.

    Files are decoded as the extractor decodes them (``backbones.image.read_image``: EXIF
    orientation applied; :class:`~regionspot_pl.backbones.image.ImageReadError` for a missing or
    undecodable file); PIL images and arrays are taken as they are.
    """
    if isinstance(image, (str, Path)):
        return read_image(image)[0]
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageReadError(
                f"image array must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}; "
                "convert with np.asarray(PIL.Image.open(f).convert('RGB'))"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageReadError(f"image array is empty: {image.shape}")
        return np.ascontiguousarray(image)
    raise TypeError(f"image must be a path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")


def check_boxes(boxes: BoxesLike, image_size: tuple[int, int]) -> Tensor:
    """Validate xyxy pixel boxes against an image of (H, W); returns them as [N, 4] float32.

    Raises PromptError naming the first offending box and the image size.
    """
    height, width = image_size
    try:
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise PromptError(f"boxes must be numbers [[x1, y1, x2, y2], ...], got {boxes!r}") from err
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim == 1 and t.shape[0] == 4:
        t = t[None]  # one box given flat
    if t.ndim != 2 or t.shape[1] != 4:
        raise PromptError(f"boxes must be [N, 4] xyxy pixels, got shape {tuple(t.shape)}")
    tol = _BORDER_TOLERANCE
    for i, (x1, y1, x2, y2) in enumerate(t.tolist()):
        where = f"box {i} [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        if not all(np.isfinite([x1, y1, x2, y2])):
            raise PromptError(f"{where} has a non-finite coordinate")
        if x2 <= x1 or y2 <= y1:
            raise PromptError(
                f"{where} is not x1,y1,x2,y2 with x2 > x1 and y2 > y1 (boxes are corners in pixels, not x,y,w,h)"
            )
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise PromptError(
                f"{where} is outside the image of {width}x{height} (W x H); coordinates must "
                f"lie in [0, {width}] x [0, {height}]"
            )
    return t


def read_vocabulary(vocabulary: VocabularyLike) -> list[str]:
    """Class names from a list, or from a text file (one name a line, blank lines skipped)."""
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary)
        if not path.is_file():
            raise VocabularyError(
                f"vocabulary file not found: {path} (pass a list of names, or a text file with one class name a line)"
            )
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        source = str(path)
    else:
        names = [str(n).strip() for n in vocabulary]
        source = "the vocabulary"
        if any(not n for n in names):
            raise VocabularyError(f"{source} holds an empty class name: {list(vocabulary)!r}")
    if not names:
        raise VocabularyError(f"{source} is empty: give at least one class name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Softmax over a repeated name splits its probability between the copies.
        raise VocabularyError(f"{source} repeats class names {duplicates}; list each class once")
    return names


def _regions_of(value: PointsLike, name: str, per_point: int) -> list[np.ndarray]:
    """``point_coords`` (per_point 2) or ``point_labels`` (1) -> one float64 array per region:
    [K, 2] / [K] is one region (as ``SamPredictor.predict``), [N, K, 2] / [N, K] is N regions
    (as ``predict_torch``), a list of such per-region arrays allows a different K each."""
    single = 2 if per_point == 2 else 1
    shape_hint = "[K, 2] x, y" if per_point == 2 else "[K] labels"
    usage = f"{name} must be {shape_hint} for one region, a batch of N such regions, or a list of N per-region arrays"
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
        if array.size == 0 and array.ndim <= 1:
            return []  # no points at all, as boxes=[] is no boxes
    except (TypeError, ValueError):  # ragged: regions with different numbers of points
        if not isinstance(value, (list, tuple)):
            raise PromptError(f"{usage}; got {value!r}") from None
        regions = []
        for i, entry in enumerate(value):
            one = _regions_of(entry, f"{name}[{i}]", per_point)
            if len(one) != 1:
                raise PromptError(f"{usage}; entry {i} of the list is not one region's {shape_hint}") from None
            regions.append(one[0])
        return regions
    if per_point == 2 and array.ndim >= 1 and array.shape[-1] != 2 and array.size:
        raise PromptError(f"{usage}; got shape {array.shape}")
    if array.ndim == single:
        return [array]
    if array.ndim == single + 1:
        return list(array)
    raise PromptError(f"{usage}; got shape {array.shape}")


def check_points(
    point_coords: PointsLike | None,
    point_labels: PointsLike | None,
    image_size: tuple[int, int],
) -> list[tuple[Tensor, Tensor]]:
    """Validate SAM point prompts against an image of (H, W).

    Args:
        point_coords: x, y pixels: [K, 2] for one region, [N, K, 2] for N, or a list of N
            [K_i, 2] arrays.
        point_labels: the same layout without the last axis; 1 foreground, 0 background.
            None: every point is foreground.

    Returns:
        one (coords [K, 2] float32, labels [K] int64) per region; [] for no points.

    Raises PromptError naming the first offending region and point.
    """
    if point_coords is None:
        if point_labels is not None:
            raise PromptError("point_labels given without point_coords")
        return []
    coords = _regions_of(point_coords, "point_coords", 2)
    if point_labels is None:
        labels = [np.ones(len(c)) for c in coords]
    else:
        labels = _regions_of(point_labels, "point_labels", 1)
    if not coords and not labels:
        return []
    if len(labels) != len(coords):
        raise PromptError(f"point_coords has {len(coords)} regions but point_labels {len(labels)}")
    height, width = image_size
    tol = _BORDER_TOLERANCE
    out = []
    for r, (xy, lab) in enumerate(zip(coords, labels)):
        xy = xy.reshape(-1, 2) if xy.size == 0 else xy
        if len(xy) == 0:
            raise PromptError(f"region {r} has no points; give at least one x, y")
        if lab.shape != (len(xy),):
            raise PromptError(f"region {r} has {len(xy)} points but {lab.size} point_labels")
        for i, (x, y) in enumerate(xy.tolist()):
            where = f"point {i} of region {r} (x={x:g}, y={y:g})"
            if not np.isfinite([x, y]).all():
                raise PromptError(f"{where} has a non-finite coordinate")
            if x < -tol or y < -tol or x > width + tol or y > height + tol:
                raise PromptError(
                    f"{where} is outside the image of {width}x{height} (W x H); coordinates "
                    f"must lie in [0, {width}] x [0, {height}]"
                )
        bad = [v for v in lab.tolist() if v not in (0.0, 1.0)]
        if bad:
            raise PromptError(
                f"point_labels of region {r} hold {bad[0]:g}; a label is 1 (foreground) or 0 (background)"
            )
        out.append((torch.as_tensor(xy, dtype=torch.float32), torch.as_tensor(lab).long()))
    return out


@dataclass(frozen=True)
class RegionPrompt:
    """One region's SAM prompt in pixels of the original image: a box, points, or both."""

    box: Tensor | None = None  # [4] x1, y1, x2, y2
    point_coords: Tensor | None = None  # [K, 2] x, y
    point_labels: Tensor | None = None  # [K] 1 foreground, 0 background

    @property
    def signature(self) -> tuple[bool, int]:
        """(has a box, number of points): prompts alike in both share one decoder call."""
        return self.box is not None, 0 if self.point_coords is None else len(self.point_coords)

    def describe(self) -> dict[str, Any]:
        """The prompt as JSON-ready lists (None where absent)."""
        return {
            "box": None if self.box is None else [float(v) for v in self.box.tolist()],
            "point_coords": None if self.point_coords is None else self.point_coords.tolist(),
            "point_labels": None if self.point_labels is None else self.point_labels.tolist(),
        }


def region_prompts(
    boxes: BoxesLike | None,
    point_coords: PointsLike | None,
    point_labels: PointsLike | None,
    image_size: tuple[int, int],
) -> list[RegionPrompt]:
    """Boxes and/or point prompts -> one checked :class:`RegionPrompt` per region.

    With both, region i is box i with the points of region i, so their counts must agree.
    """
    checked = check_boxes(boxes, image_size) if boxes is not None else torch.zeros(0, 4)
    points = check_points(point_coords, point_labels, image_size)
    if len(checked) and points and len(checked) != len(points):
        raise PromptError(
            f"{len(checked)} boxes but {len(points)} point prompts: with both, region i is box i "
            "together with the points of region i, so give as many of each"
        )
    n = max(len(checked), len(points))
    return [
        RegionPrompt(
            box=checked[i] if len(checked) else None,
            point_coords=points[i][0] if points else None,
            point_labels=points[i][1] if points else None,
        )
        for i in range(n)
    ]


def grouped_prompts(prompts: list[RegionPrompt]) -> list[tuple[list[int], Prompts]]:
    """Regions -> (their indices, one :class:`~regionspot_pl.backbones.interfaces.Prompts`) per
    group of regions alike in :attr:`RegionPrompt.signature`: SAM decodes together only prompts
    with the same kind and number of points."""
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.signature, []).append(i)
    out = []
    for indices in groups.values():
        alike = [prompts[i] for i in indices]
        boxes = torch.stack([p.box for p in alike]) if alike[0].box is not None else None
        coords = labels = None
        if alike[0].point_coords is not None:
            coords = torch.stack([p.point_coords for p in alike])
            labels = torch.stack([p.point_labels for p in alike])
        out.append((indices, Prompts(boxes, coords, labels)))
    return out
