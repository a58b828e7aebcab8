"""Pictures: named regions with masks, SAM point prompts and "name everything" masks,
region-query attention heat maps (paper Fig. 4), grids.

Everything returns a ``PIL.Image``. Small images (the demo's are 256 px) are enlarged by an
integer factor before drawing (``min_size``), so that captions stay readable; boxes, masks and
heat maps are scaled with them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

ImageInput = Image.Image | np.ndarray

CORRECT = (40, 200, 70)
WRONG = (230, 40, 40)
_MASK_ALPHA = 0.4
_HEAT_ALPHA = 0.55


def _to_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or HxWx3 uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _upscale_factor(size: tuple[int, int], min_size: int) -> int:
    """Integer factor that brings the longer side to at least ``min_size`` (1 if already there)."""
    longest = max(size)
    return max(1, math.ceil(min_size / longest)) if min_size > 0 and longest > 0 else 1


def _font(image_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # a fixed fraction of the width, never below 13 px: readable on small pictures and on photos
    return ImageFont.load_default(size=max(13, image_width // 36))


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, saturated colours (matplotlib tab10, then tab20 beyond 10)."""
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    count = 10 if n <= 10 else 20
    return [tuple(int(255 * c) for c in cmap(i % count)[:3]) for i in range(n)]


def _caption(
    draw: ImageDraw.ImageDraw,
    text: str,
    anchor: tuple[float, float],
    fill: tuple[int, int, int],
    font,
    image_size: tuple[int, int],
    outline: tuple[int, int, int] | None = None,
    taken: list[tuple[float, float, float, float]] | None = None,
) -> None:
    """A filled label at the box corner ``anchor``: above it if there is room, else just inside;
    moved down past captions already in ``taken`` (which it joins), so none covers another."""
    x, y = anchor
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 3
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0, x), image_size[0] - w)
    y = y - h if y - h >= 0 else y
    taken = taken if taken is not None else []
    moved = True
    while moved:  # terminates: y only grows, and each step passes one caption
        moved = False
        for tx1, ty1, tx2, ty2 in taken:
            if x < tx2 and tx1 < x + w and y < ty2 and ty1 < y + h:
                y, moved = ty2 + 1, True
    y = min(max(0, y), image_size[1] - h)
    taken.append((x, y, x + w, y + h))
    width = 3 if outline is not None else 0
    draw.rectangle([x, y, x + w, y + h], fill=fill, outline=outline, width=width)
    # dark text on light colours, white text on dark ones
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    draw.text((x + pad - left, y + pad - top), text, fill=ink, font=font)


def draw_detections(
    image: ImageInput,
    boxes: Sequence[Sequence[float] | None] | np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float],
    masks: Sequence[np.ndarray] | np.ndarray | None = None,
    gt_labels: Sequence[str] | None = None,
    min_size: int = 512,
    points: Sequence[tuple[Sequence[Sequence[float]], Sequence[int]] | None] | None = None,
) -> Image.Image:
    """Draw named regions (boxes, masks, point prompts) on an image.

    Args:
        image: HxWx3 uint8 array or PIL image.
        boxes: [N] x1, y1, x2, y2 in pixels of ``image``; None for a region prompted by points
            only (its caption then sits at its mask's, else its points', top-left corner).
        labels, scores: [N] top class name and its probability per region.
        masks: [N] HxW bool masks, overlaid in each region's colour; None for none.
        gt_labels: [N] true names; the caption gets a green outline when the label is right,
            a red one (and the true name) when it is wrong.
        min_size: enlarge small images by an integer factor to this longer side (0: never).
        points: [N] (point_coords [K][2], point_labels [K]) or None per region: drawn as dots
            in the region's colour, with a white ring for foreground (1) and a black ring with
            a cross for background (0).

    Returns:
        the picture (size = image size x the upscale factor).
    """
    base = _to_pil(image)
    n = len(boxes)
    _check_entries(n, labels, scores, gt_labels=gt_labels, masks=masks, points=points)
    colours = palette(n)
    picture = _with_masks(base, masks, colours)
    scale = _upscale_factor(picture.size, min_size)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)

    draw = ImageDraw.Draw(picture)
    line = max(2, picture.width // 250)
    # boxes first, then all captions, so that no box line crosses a caption
    for box, colour in zip(boxes, colours):
        if box is not None:
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=line)
    for prompt, colour in zip(points or [], colours):
        if prompt is not None:
            _draw_points(draw, prompt, colour, scale, radius=max(4, picture.width // 90))
    corners = [
        box if box is not None else _corner(masks[i] if masks is not None else None, points[i] if points else None)
        for i, box in enumerate(boxes)
    ]
    font, taken = _font(picture.width), []
    for i, (corner, colour) in enumerate(zip(corners, colours)):
        text, outline = _detection_caption(labels[i], scores[i], gt_labels[i] if gt_labels is not None else None)
        _caption(draw, text, (float(corner[0]) * scale, float(corner[1]) * scale), colour, font,
                 picture.size, outline, taken)  # fmt: skip
    return picture


def _check_entries(n: int, labels: Sequence, scores: Sequence, **per_box: Sequence | None) -> None:
    """ValueError unless labels, scores and each given per-box sequence have ``n`` entries."""
    if not (len(labels) == len(scores) == n):
        raise ValueError(f"boxes ({n}), labels ({len(labels)}) and scores ({len(scores)}) must have one entry per box")
    for name, values in per_box.items():
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} boxes")


def _with_masks(base: Image.Image, masks, colours: list[tuple[int, int, int]]) -> Image.Image:
    """``base`` with each mask blended in its colour (at the image's own size)."""
    if masks is None:
        return base.copy()
    canvas = np.asarray(base).astype(np.float32)
    for mask, colour in zip(masks, colours):
        m = np.asarray(mask, dtype=bool)
        if m.shape != canvas.shape[:2]:
            raise ValueError(f"mask shape {m.shape} does not match the image {canvas.shape[:2]}")
        canvas[m] = (1 - _MASK_ALPHA) * canvas[m] + _MASK_ALPHA * np.asarray(colour, np.float32)
    return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))


def _detection_caption(label: str, score: float, gt_label: str | None) -> tuple[str, tuple[int, int, int] | None]:
    """(caption text, outline colour): green outline when ``label`` is the true one, red (and
    the true name) when not, none without a true label."""
    text = f"{label} {float(score):.2f}"
    if gt_label is None:
        return text, None
    if label == gt_label:
        return text, CORRECT
    return f"{text} (gt: {gt_label})", WRONG


def _corner(mask: np.ndarray | None, points) -> tuple[float, float]:
    """Top-left corner of a region without a box: of its mask, else of its points."""
    if mask is not None and np.asarray(mask).any():
        rows, cols = np.nonzero(np.asarray(mask))
        return float(cols.min()), float(rows.min())
    if points is not None and len(points[0]):
        xy = np.asarray(points[0], dtype=np.float64).reshape(-1, 2)
        return float(xy[:, 0].min()), float(xy[:, 1].min())
    return 0.0, 0.0


def _draw_points(draw: ImageDraw.ImageDraw, prompt, colour, scale: int, radius: int) -> None:
    """SAM point prompts: a dot in the region's colour; white ring = foreground, black ring
    and a cross = background."""
    coords, labels = prompt
    for (x, y), label in zip(coords, labels):
        cx, cy = float(x) * scale, float(y) * scale
        ring = (255, 255, 255) if int(label) == 1 else (0, 0, 0)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour,
                     outline=ring, width=max(2, radius // 3))  # fmt: skip
        if int(label) != 1:
            d = radius * 0.6
            draw.line([cx - d, cy - d, cx + d, cy + d], fill=ring, width=2)
            draw.line([cx - d, cy + d, cx + d, cy - d], fill=ring, width=2)


def draw_masks(
    image: ImageInput,
    masks: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str],
    scores: Sequence[float],
    min_size: int = 512,
    alpha: float = 0.55,
) -> Image.Image:
    """ "Name everything" picture: each mask filled in its own colour with its outline, and
    captioned with its label and probability at the top-left of the mask.

    Args:
        image: HxWx3 uint8 array or PIL image.
        masks: [N] HxW bool masks in pixels of ``image``.
        labels, scores: [N] class name and probability per mask.
        min_size: enlarge small images by an integer factor to this longer side (0: never).
        alpha: opacity of the mask fill.

    Returns:
        the picture (size = image size x the upscale factor). Larger masks are painted first,
        so a small mask on top of a large one stays visible.
    """
    base = _to_pil(image)
    n = len(masks)
    if not (len(labels) == len(scores) == n):
        raise ValueError(f"masks ({n}), labels ({len(labels)}) and scores ({len(scores)}) must have one entry per mask")
    scale = _upscale_factor(base.size, min_size)
    picture = base.resize((base.width * scale, base.height * scale), Image.Resampling.BICUBIC)
    canvas = np.asarray(picture).astype(np.float32)
    colours = palette(n)
    big = [np.asarray(m, dtype=bool) for m in masks]
    for m in big:
        if m.shape != (base.height, base.width):
            raise ValueError(f"mask shape {m.shape} does not match the image {(base.height, base.width)}")
    big = [m.repeat(scale, 0).repeat(scale, 1) if scale > 1 else m for m in big]
    width = max(1, picture.width // 300)
    for i in sorted(range(n), key=lambda i: -int(big[i].sum())):
        colour = np.asarray(colours[i], np.float32)
        canvas[big[i]] = (1 - alpha) * canvas[big[i]] + alpha * colour
        canvas[_outline(big[i], width)] = colour
    picture = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = _font(picture.width)
    taken: list[tuple[float, float, float, float]] = []
    for i in range(n):
        x, y = _corner(big[i], None)
        _caption(draw, f"{labels[i]} {float(scores[i]):.2f}", (x, y), colours[i], font,
                 picture.size, None, taken)  # fmt: skip
    return picture


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def draw_attention(
    image: ImageInput,
    box: Sequence[float],
    attention: Sequence[float] | np.ndarray,
    grid: int | None = None,
    title: str | None = None,
    min_size: int = 512,
    cmap: str = "jet",
    value_range: tuple[float, float] | None = None,
) -> Image.Image:
    """One region query's attention over the CLIP feature map, as a heat map on the image.

    CLIP sees the whole image resized to a square, so patch (r, c) of the ``grid x grid`` map
    covers the same fraction of the image whatever its aspect ratio: the map is upsampled
    straight to the image size. Colours span the patch weights' own min..max (blue..red with
    ``jet``); the caption gives the class-token weight and that range (absolute; rows sum to 1).

    Args:
        image: HxWx3 uint8 array or PIL image.
        box: x1, y1, x2, y2 of the query's box, in pixels of ``image``.
        attention: [T] weights over CLIP tokens, class token first (T = 1 + grid^2).
        grid: side of the patch grid (14 for ViT-B/16 at 224); None infers it from T.
        title: first caption line (e.g. the box's label).
        value_range: (low, high) patch weights the colours span; give several panels the same
            range to compare them (e.g. decoder layers). None: this map's own min..max.
    """
    base = _to_pil(image)
    weights = np.asarray(attention, dtype=np.float64).reshape(-1)
    if grid is None:
        grid = int(round(math.sqrt(len(weights) - 1)))
    if len(weights) != 1 + grid * grid:
        raise ValueError(
            f"attention has {len(weights)} weights; expected 1 class token + {grid}x{grid} patches = {1 + grid * grid}"
        )
    cls_weight, patches = float(weights[0]), weights[1:].reshape(grid, grid)
    low, peak = float(patches.min()), float(patches.max())
    # By default min-max: the colours span this query's own range (an untrained head is near
    # uniform, 1/T everywhere, and would paint the whole image hot on a 0..max scale); the
    # caption always gives the map's true range.
    lo, hi = value_range if value_range is not None else (low, peak)
    normalized = np.clip((patches - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(patches)
    scale = _upscale_factor(base.size, min_size)
    picture = _heat_overlay(base, normalized, scale, cmap)

    draw = ImageDraw.Draw(picture)
    line = max(2, picture.width // 200)
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=line + 2)
    draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=max(1, line - 1))
    lines = ([title] if title else []) + [f"class token {cls_weight:.3f} | patches {low:.4f}-{peak:.4f}"]
    return _with_caption_band(picture, lines)


def _heat_overlay(base: Image.Image, normalized: np.ndarray, scale: int, cmap: str) -> Image.Image:
    """``base`` enlarged ``scale`` times with the [0, 1] patch map blended over it in ``cmap``."""
    size = (base.width * scale, base.height * scale)
    picture = base.resize(size, Image.Resampling.BICUBIC) if scale > 1 else base
    # upsample the [0, 1] map as an 8-bit image (bilinear), then colour it
    heat = Image.fromarray((normalized * 255).round().astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    coloured = colormaps[cmap](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3] * 255
    blended = (1 - _HEAT_ALPHA) * np.asarray(picture, np.float32) + _HEAT_ALPHA * coloured
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def _with_caption_band(picture: Image.Image, lines: list[str]) -> Image.Image:
    """``picture`` with ``lines`` written in a white band below it, so they never hide it."""
    font = _font(picture.width)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heights = [measure.textbbox((0, 0), t, font=font) for t in lines]
    line_h = max(b[3] - b[1] for b in heights) + 6
    band = line_h * len(lines) + 8
    out = Image.new("RGB", (picture.width, picture.height + band), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (text, bbox) in enumerate(zip(lines, heights)):
        draw.text((6 - bbox[0], picture.height + 4 + i * line_h - bbox[1]), text, fill=(0, 0, 0), font=font)
    return out


def save_grid(
    images: Sequence[Image.Image],
    path: str | Path,
    cols: int,
    gap: int = 8,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Paste pictures into a grid (row-major, each cell as large as the largest picture) and save.

    Returns the written path (its parent folder is created).
    """
    if not images:
        raise ValueError("save_grid needs at least one image")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    sheet = Image.new("RGB", (cols * cell_w + (cols + 1) * gap, rows * cell_h + (rows + 1) * gap), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB"), (gap + c * (cell_w + gap), gap + r * (cell_h + gap)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
