"""Drawing one demo scene: cluttered background, textured shapes, occlusions kept partial."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .categories import COLOURS, Category

_MIN_VISIBLE = 0.55  # fraction of an object's own area that must stay visible under occluders
# Object radius range as a fraction of the image side: the smallest objects still span about 1/5
# of the side, several 16-pixel CLIP patches once the image is resized to 224.
_RADIUS_RANGE = (0.1, 0.21)


# ----------------------------------------------------------------------------- shapes


def _circle(r: float = 1.0, n: int = 48, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star() -> np.ndarray:
    pts = _regular(10)
    pts[1::2] *= 0.45
    return pts


_W = 0.34  # half-width of the cross's arms
_CROSS = np.array([(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1),
                   (-_W, 1), (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)], float)  # fmt: skip
_ARROW = np.array([(-1, -0.26), (0.15, -0.26), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.26),
                   (-1, 0.26)], float)  # fmt: skip

# Each shape is a list of (polygon in a unit frame, fill): fill 0 cuts a hole (ring, crescent).
_SHAPE_POLYS: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_circle(), 1)],
    "square": [(np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), 1)],
    "triangle": [(_regular(3) + np.array([0.0, 0.2]), 1)],
    "star": [(_star(), 1)],
    "cross": [(_CROSS, 1)],
    "ring": [(_circle(), 1), (_circle(0.55), 0)],
    "diamond": [(np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], float), 1)],
    "hexagon": [(_regular(6, phase=0.0), 1)],
    "crescent": [(_circle(), 1), (_circle(0.82, cx=0.45, cy=-0.15), 0)],
    "arrow": [(_ARROW, 1)],
}


def _shape_polys(shape: str, radius: float, aspect: float, angle: float) -> list[tuple[np.ndarray, int]]:
    """The shape's polygons scaled, stretched and rotated about the origin (pixel units)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scale = np.array([radius * aspect, radius / aspect])
    return [((poly * scale) @ rot.T, fill) for poly, fill in _SHAPE_POLYS[shape]]


# ----------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise in [-1, 1] (a small random grid upsampled bicubically)."""
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    return np.asarray(big, np.float32) / 127.5 - 1.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient + low-frequency noise + faint lines, scribbles and blobs (not objects)."""
    grey = rng.uniform(70, 185)
    ends = grey + rng.uniform(-55, 55, (2, 3))  # two muted colours near one grey level
    phi = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * math.cos(phi) + (yy - 0.5) * math.sin(phi), 0, 1)
    img = ends[0] + t[..., None] * (ends[1] - ends[0])
    img += rng.uniform(8, 28) * _smooth_noise(rng, size, int(rng.integers(3, 9)))

    # Clutter is drawn on a separate layer and blended faintly, so it never looks like an object.
    layer = Image.new("RGB", (size, size))
    alpha = Image.new("L", (size, size))
    dl, da = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    base = img.mean((0, 1))
    for _ in range(int(rng.integers(2, 6))):  # soft blobs
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.2, 2) * size
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-70, 70, 3), 0, 255))
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        dl.ellipse(box, fill=col)
        da.ellipse(box, fill=int(rng.integers(50, 110)))
    alpha = alpha.filter(ImageFilter.GaussianBlur(size / 40))
    for _ in range(int(rng.integers(3, 10))):  # straight lines and random-walk scribbles
        n = 2 if rng.random() < 0.6 else int(rng.integers(4, 9))
        pts = [tuple(p) for p in rng.uniform(-0.1, 1.1, (n, 2)) * size]
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-90, 90, 3), 0, 255))
        width = int(rng.integers(1, 4))
        dl.line(pts, fill=col, width=width)
        da.line(pts, fill=int(rng.integers(60, 150)), width=width)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    return img * (1 - a) + np.asarray(layer, np.float32) * a


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean pattern (True = secondary colour) in the object's own (u, v) frame."""
    if texture == "striped":
        return (u / period) % 1.0 < 0.5
    if texture == "checkered":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    if texture == "dotted":
        du = u - period * np.round(u / period)
        dv = v - period * np.round(v / period)
        return du * du + dv * dv < (0.32 * period) ** 2
    return np.zeros(u.shape, bool)


@dataclass
class _Placed:
    category_id: int
    full_area: int


def render_image(
    rng: np.random.Generator, size: int, plan: list[int], cats: dict[int, Category]
) -> tuple[np.ndarray, np.ndarray, list[_Placed]]:
    """Draw one scene. Returns (uint8 HxWx3 image, int label map 0=background, placed objects)."""
    img = _background(rng, size)
    labels = np.zeros((size, size), np.int32)
    placed: list[_Placed] = []
    visible: list[int] = []
    centres: list[tuple[float, float, float]] = []
    for cid in plan:
        cat = cats[cid]
        min_radius = _RADIUS_RANGE[0] * size
        radius = size * math.exp(rng.uniform(*np.log(_RADIUS_RANGE)))
        aspect = math.exp(rng.uniform(-0.15, 0.15))
        angle = rng.uniform(0, 2 * np.pi)
        for _attempt in range(40):
            polys = _shape_polys(cat.shape, radius, aspect, angle)
            lo, hi = polys[0][0].min(0), polys[0][0].max(0)
            room_lo, room_hi = 1 - lo, size - 2 - hi
            if np.any(room_hi <= room_lo):
                radius *= 0.9
                continue
            if centres and rng.random() < 0.4:  # lean on an existing object to make occlusions
                ox, oy, orad = centres[int(rng.integers(len(centres)))]
                d = (orad + radius) * rng.uniform(0.55, 0.95)
                phi = rng.uniform(0, 2 * np.pi)
                centre = np.clip([ox + d * math.cos(phi), oy + d * math.sin(phi)], room_lo, room_hi)
            else:
                centre = rng.uniform(room_lo, room_hi)
            mimg = Image.new("L", (size, size))
            draw = ImageDraw.Draw(mimg)
            for poly, fill in polys:
                draw.polygon([tuple(p) for p in poly + centre], fill=fill)
            mask = np.asarray(mimg, bool)
            area = int(mask.sum())
            covered = np.bincount(labels[mask], minlength=len(placed) + 1)[1:]
            ok = all(vis - cov >= _MIN_VISIBLE * p.full_area for vis, cov, p in zip(visible, covered, placed))
            if ok and area > 0:
                break
            radius = max(min_radius, radius * 0.93)  # smaller ones fit between the others
        else:
            continue  # no room left: drop this object (counts are taken from what was drawn)
        visible = [vis - int(cov) for vis, cov in zip(visible, covered)]
        placed.append(_Placed(cid, area))
        visible.append(area)
        centres.append((float(centre[0]), float(centre[1]), radius))
        labels[mask] = len(placed)
        _paint(rng, img, mask, cat, centre, radius, angle)
    img += rng.normal(0, 4.0, img.shape).astype(np.float32)  # sensor-like noise over everything
    return np.clip(img, 0, 255).astype(np.uint8), labels, placed


def _paint(
    rng: np.random.Generator,
    img: np.ndarray,
    mask: np.ndarray,
    cat: Category,
    centre: np.ndarray,
    radius: float,
    angle: float,
) -> None:
    """Fill ``mask`` with the category's colour and texture (jittered, mildly shaded), in place."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xx -= centre[0]
    yy -= centre[1]
    tex_angle = angle + rng.uniform(-0.4, 0.4)
    c, s = math.cos(tex_angle), math.sin(tex_angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    period = max(6.0, radius * rng.uniform(0.28, 0.4))
    pattern = _texture(cat.texture, u + rng.uniform(0, period), v, period)

    primary = np.clip(np.array(COLOURS[cat.colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
    # The second tone is a dark version of the same hue, so the colour name stays true.
    secondary = primary * rng.uniform(0.22, 0.38)
    colour = np.where(pattern[..., None], secondary, primary)
    # A gentle light gradient across the object, so objects are not perfectly flat.
    shade = 1.0 + 0.12 * (u * math.cos(angle) + v * math.sin(angle)) / max(radius, 1.0)
    window = mask[y0:y1, x0:x1]
    img[y0:y1, x0:x1][window] = (colour * shade[..., None])[window]
