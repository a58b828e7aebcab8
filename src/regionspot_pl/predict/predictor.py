"""The predictor: name any region of one image with a trained RegionSpot head.

:class:`Predictor` holds the frozen SAM + CLIP and a head; ``set_image`` computes an image's
features once, then ``predict`` names regions given as SAM prompts in pixels of the original
image: boxes, points (1 foreground, 0 background), or both (region i is box i with the points of
region i). ``python -m regionspot_pl.predict`` is its command line.

The predictor computes features exactly as ``python -m regionspot_pl.extract`` does (same
preprocessing, same autocast, CLIP and SAM tokens rounded through float16 as the cache stores
them), so its probabilities equal those of the batch path for the same image and boxes.

Bad input a user can give (an unreadable image, a box outside it, malformed points, an empty
vocabulary, a head that does not fit the CLIP) raises a :class:`~regionspot_pl.errors.RegionSpotError`
subclass naming what is wrong.
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
from torch.nn import functional as F

from ..backbones.clip import ClipEncoder, clip_preprocess, load_clip, model_identity, text_embeddings
from ..backbones.common import DEFAULT_TEXT_CACHE, autocast_for
from ..backbones.image import (
    ImageReadError,
    masks_to_original,
    pil_to_rgb,
    read_image,
    resize_for_backbones,
    scale_boxes,
)
from ..backbones.sam import SamRegionEncoder, build_sam
from ..errors import RegionSpotError
from ..model import RegionSpotHead, load_head, region_logits
from ..model.head import check_head_fits


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


def scale_points(points: Tensor, original_size: tuple[int, int], resized_size: tuple[int, int]) -> Tensor:
    """[..., 2] x, y in original pixels -> the resized image's pixels, scaled by (w / W, h / H)
    as ``scale_boxes`` scales box corners."""
    (height, width), (new_h, new_w) = original_size, resized_size
    factors = torch.tensor([new_w / width, new_h / height], dtype=torch.float64)
    return (points.to(torch.float64) * factors.to(points.device)).to(torch.float32)


class _CrossAttentionRecorder:
    """Forward hook on one decoder layer's cross-attention (default: the last) that records its weights.

    ``TransformerDecoderLayer`` calls its ``multihead_attn`` with ``need_weights=False``; the
    hook re-runs the same module's ``forward`` (which does not fire hooks again) on the same
    inputs with ``need_weights=True``, so the head's own forward stays untouched.
    Weights are averaged over heads: [B, N, T], each row sums to 1.
    """

    def __init__(self, head: RegionSpotHead, layer: int = -1) -> None:
        self.module = head.decoder.layers[layer].multihead_attn
        self.weights: Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        query, key, value = args[:3]
        _, weights = module.forward(
            query,
            key,
            value,
            key_padding_mask=kwargs.get("key_padding_mask"),
            attn_mask=kwargs.get("attn_mask"),
            need_weights=True,
            average_attn_weights=True,
        )
        self.weights = weights.detach().float()

    def remove(self) -> None:
        self._handle.remove()


def _check_head_fits(head: RegionSpotHead, clip: ClipEncoder, head_name: str, clip_name: str) -> None:
    """The head's CLIP width and text dim must be the CLIP model's (a BL head needs ViT-L/14)."""
    check_head_fits(head.config, clip.vision_dim, clip.text_dim, clip_name, head_name)


class Predictor:
    """Frozen SAM + CLIP + a trained head: set an image once, then name any of its regions
    (boxes, points, or both, as SAM takes them).

    Attributes:
        head, sam, clip: the models, in eval mode on ``device``.
        clip_grid: side of CLIP's patch grid (14 for ViT-B/16 at 224); tokens T = 1 + grid^2.
        image: the current image, HxWx3 uint8 (None before ``set_image``).
    """

    def __init__(
        self,
        head: RegionSpotHead,
        sam: SamRegionEncoder,
        clip: ClipEncoder,
        clip_id: str,
        device: str | torch.device = "cpu",
        text_cache: str | Path | None = None,
        precision: str = "auto",
    ) -> None:
        _check_head_fits(head, clip, "the head", "the CLIP model")
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()
        self.sam = sam.to(self.device).eval()
        self.clip = clip.to(self.device).eval()
        self.clip_id = clip_id
        self.text_cache = Path(text_cache if text_cache is not None else DEFAULT_TEXT_CACHE)
        self.precision = precision
        vision = clip.model.config.vision_config
        self.clip_grid: int = int(vision.image_size) // int(vision.patch_size)
        self.image: np.ndarray | None = None
        self._sam_embedding: Tensor | None = None  # [256, h, w]
        self._resized_size: tuple[int, int] = (0, 0)  # (h, w) of the image the backbones saw
        self._clip_tokens: Tensor | None = None  # [T, vision_dim], float16-rounded, float32
        self._texts: dict[tuple[str, ...], Tensor] = {}
        # prompts per SAM decoder call: it repeats the image embedding per prompt, so a bound
        # keeps "name everything" (hundreds of masks) within memory
        self.chunk_size: int | None = 64

    @classmethod
    def from_pretrained(
        cls,
        head: str | Path,
        sam_type: str,
        sam_checkpoint: str | Path,
        clip_model: str | Path,
        device: str = "cpu",
        text_cache: str | Path | None = None,
        precision: str = "auto",
    ) -> Predictor:
        """Load the head (a ``.pt`` file, a model folder or a Hugging Face Hub id), SAM
        (``sam_type`` + checkpoint) and a local CLIP directory.

        ``text_cache``: HDF5 file of text embeddings (default ``cache/text_embeddings.h5``, the
        extractor's). ``precision``: autocast as in extraction (auto = fp32 on CPU).
        """
        head_module = load_head(head)
        clip_model_hf, tokenizer = load_clip(clip_model)
        clip = ClipEncoder(clip_model_hf, tokenizer)
        # before building SAM, which can take a while for the real models
        _check_head_fits(head_module, clip, f"head {head}", f"the CLIP model in {clip_model}")
        sam = SamRegionEncoder(build_sam(sam_type, sam_checkpoint))
        return cls(head_module, sam, clip, model_identity(clip_model), device, text_cache, precision)

    # ----------------------------------------------------------------------------------- image
    @torch.inference_mode()
    def set_image(self, image: ImageLike) -> None:
        """Compute the SAM image embedding and the CLIP feature map of ``image``, once.

        Same inputs, autocast and float16 rounding as ``FeatureExtractor``; later ``predict``
        calls only run SAM's prompt encoder + mask decoder and the head.
        """
        pixels = load_image(image)
        resized = resize_for_backbones(pixels)  # the image both backbones see
        sam_in = self.sam.prepare([self.sam.transform.resize(resized)])
        clip_image = torch.from_numpy(resized).permute(2, 0, 1).to(self.device)
        clip_in = clip_preprocess(clip_image, self.clip.image_size)
        with autocast_for(self.device, self.precision):
            embedding = self.sam.encode_images(sam_in)[0]
            # The cache holds CLIP tokens in float16; round them the same way.
            clip_tokens = self.clip.feature_map(clip_in[None]).half()[0]
        self._sam_embedding = embedding
        self._clip_tokens = clip_tokens.float()
        self._resized_size = (int(resized.shape[0]), int(resized.shape[1]))
        self.image = pixels

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the current image."""
        self._require_image()
        return int(self.image.shape[0]), int(self.image.shape[1])

    def _require_image(self) -> None:
        if self.image is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")

    # --------------------------------------------------------------------------------- regions
    @torch.inference_mode()
    def _prompt_tokens(self, prompts: list[RegionPrompt], multimask: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """SAM on N prompts (original pixels) through the resized image, as extraction does.

        Prompts alike in :attr:`RegionPrompt.signature` share one decoder call; the others are
        decoded separately, since SAM batches only prompts with the same number of points.

        Returns:
            tokens [N, 256] (multimask: [N, 3, 256]), float16-rounded as the cache stores them;
            masks [N, H, W] bool at the original size ([N, 3, H, W]); iou [N] ([N, 3]).
        """
        assert self._sam_embedding is not None
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.signature, []).append(i)
        parts = [(idx, self._decode_group([prompts[i] for i in idx], multimask)) for idx in groups.values()]
        outputs = []
        for j in range(3):  # tokens, masks, iou, each back in the order of the prompts
            first = parts[0][1][j]
            out = first.new_empty((len(prompts), *first.shape[1:]))
            for idx, decoded in parts:
                out[torch.as_tensor(idx, device=out.device)] = decoded[j]
            outputs.append(out)
        return outputs[0], outputs[1], outputs[2]

    def _decode_group(self, prompts: list[RegionPrompt], multimask: bool) -> tuple[Tensor, Tensor, Tensor]:
        """One batch of prompts with one signature -> (tokens, masks, iou), see _prompt_tokens."""
        original, resized = self.image_size, self._resized_size
        boxes = coords = labels = None
        if prompts[0].box is not None:
            boxes = scale_boxes(torch.stack([p.box for p in prompts]).to(self.device), original, resized)
        if prompts[0].point_coords is not None:
            coords = torch.stack([p.point_coords for p in prompts]).to(self.device)
            coords = scale_points(coords, original, resized)
            labels = torch.stack([p.point_labels for p in prompts]).to(self.device)
        with autocast_for(self.device, self.precision):
            tokens, masks, iou = self.sam.encode_prompts(
                self._sam_embedding, resized, boxes=boxes, point_coords=coords,
                point_labels=labels, multimask_output=multimask, chunk_size=self.chunk_size,
            )  # fmt: skip
        lead = masks.shape[:-2]
        masks = masks_to_original(masks.reshape(-1, *masks.shape[-2:]), original)
        # The cache stores SAM tokens in float16 too (the batch path reads them back as float32).
        return tokens.float().half().float(), masks.reshape(*lead, *original), iou.float()

    @torch.inference_mode()
    def _run_head(self, tokens: Tensor, with_attention: bool, layer: int = -1) -> tuple[Tensor, Tensor | None]:
        """Region tokens [N, 256] -> (embeddings [N, text_dim], attention of ``layer`` [N, T] or None).

        Multimask tokens [N, 3, 256] -> [N, 3, text_dim] (and [N, 3, T]): one head pass per
        candidate index, so each pass has the N queries a single-mask call has (the head's
        self-attention lets the queries of one pass see each other, as in training).
        """
        if tokens.ndim == 3:
            runs = [self._run_head(tokens[:, j], with_attention, layer) for j in range(tokens.shape[1])]
            attention = torch.stack([r[1] for r in runs], 1) if with_attention else None
            return torch.stack([r[0] for r in runs], 1), attention
        assert self._clip_tokens is not None
        hook = _CrossAttentionRecorder(self.head, layer) if with_attention else None
        try:
            embeddings = self.head(tokens[None].to(self.device), self._clip_tokens[None])[0]
        finally:
            if hook is not None:
                hook.remove()
        if hook is None:
            return embeddings, None
        attention = hook.weights[0]
        if not self.head.config.use_class_token:
            # The head never saw the class token; give it weight 0 so T is always CLIP's count.
            attention = torch.cat([attention.new_zeros(attention.shape[0], 1), attention], dim=1)
        return embeddings, attention.cpu()

    def _text(self, names: list[str]) -> Tensor:
        key = tuple(names)
        if key not in self._texts:
            self._texts[key] = text_embeddings(self.clip, names, self.text_cache, self.clip_id)
        return self._texts[key]

    def predict(
        self,
        boxes: BoxesLike | None = None,
        vocabulary: VocabularyLike | None = None,
        topk: int = 5,
        return_attention: bool = False,
        *,
        point_coords: PointsLike | None = None,
        point_labels: PointsLike | None = None,
        multimask_output: bool = False,
    ) -> list[dict[str, Any]]:
        """Name each region of the current image: a box, points, or both, as SAM takes them.

        The regions of one call are the queries of one image and attend to each other in the
        head's self-attention, as all boxes of an image do in training and in the batch path:
        a region's scores therefore depend on the other regions passed with it.

        Args:
            boxes: [N, 4] x1, y1, x2, y2 in pixels of the image given to ``set_image``, or None.
            vocabulary: class names, or a text file with one name a line.
            topk: labels kept per region (clamped to the vocabulary size).
            return_attention: add ``"attention"``: [T] float32, the last decoder layer's
                cross-attention of the region's query over CLIP tokens (class token first),
                averaged over heads ([3, T] with ``multimask_output``).
            point_coords: x, y pixels: [K, 2] for one region (as ``SamPredictor.predict``),
                [N, K, 2] for N regions, or a list of N [K_i, 2] arrays; None for none. With
                ``boxes`` too, region i is box i with the points of region i.
            point_labels: same layout without the last axis, 1 foreground / 0 background;
                None: all foreground.
            multimask_output: SAM's three candidate masks per region, each named.

        Returns:
            one dict per region: ``box`` [4] floats (None without a box), ``point_coords``
            [[x, y], ...] and ``point_labels`` (None without points); ``labels`` [k] names and
            ``scores`` [k] probabilities (softmax over the whole vocabulary), best first;
            ``mask`` HxW bool numpy array (SAM's prompted mask) and ``iou`` (SAM's predicted
            IoU of it). With ``multimask_output``: ``labels`` and ``scores`` [3][k], ``masks``
            [3, H, W] and ``iou`` [3], in SAM's order of the three candidates.
        """
        self._require_image()
        if topk < 1:
            raise PromptError(f"topk must be >= 1, got {topk}")
        names = read_vocabulary([] if vocabulary is None else vocabulary)
        prompts = region_prompts(boxes, point_coords, point_labels, self.image_size)
        if not prompts:
            return []
        tokens, masks, iou = self._prompt_tokens(prompts, multimask_output)
        embeddings, attention = self._run_head(tokens, return_attention)
        probs = region_logits(embeddings, self._text(names).to(embeddings.device)).softmax(-1)
        return _named_regions(prompts, names, probs.cpu(), topk, masks, iou, attention)

    def region_embeddings(
        self,
        boxes: BoxesLike | None = None,
        *,
        point_coords: PointsLike | None = None,
        point_labels: PointsLike | None = None,
        multimask_output: bool = False,
    ) -> Tensor:
        """The regions' embeddings in CLIP's text space, for retrieval or your own classifier.

        Prompts as in :meth:`predict`. ``100 * embeddings @ normalize(texts).T`` are the logits
        ``predict`` takes the softmax of (``texts``: CLIP text embeddings of class names).

        Returns:
            [N, text_dim] float32 on the CPU, L2-normalized ([N, 3, text_dim] with
            ``multimask_output``).
        """
        self._require_image()
        prompts = region_prompts(boxes, point_coords, point_labels, self.image_size)
        dim = self.head.config.text_dim
        if not prompts:
            return torch.zeros(0, *((3,) if multimask_output else ()), dim)
        tokens, _, _ = self._prompt_tokens(prompts, multimask_output)
        embeddings, _ = self._run_head(tokens, with_attention=False)
        return F.normalize(embeddings.float(), dim=-1, eps=1e-7).cpu()

    def attention_maps(
        self,
        boxes: BoxesLike | None = None,
        layer: int = -1,
        *,
        point_coords: PointsLike | None = None,
        point_labels: PointsLike | None = None,
    ) -> Tensor:
        """[N, T] cross-attention of each region's query in decoder layer ``layer`` (default the
        last; mean over heads), over the CLIP tokens of the current image, class token first;
        rows sum to 1. Prompts as in :meth:`predict`."""
        self._require_image()
        prompts = region_prompts(boxes, point_coords, point_labels, self.image_size)
        if not prompts:
            return torch.zeros(0, self.clip.num_tokens)
        tokens, _, _ = self._prompt_tokens(prompts)
        _, attention = self._run_head(tokens, with_attention=True, layer=layer)
        assert attention is not None
        return attention


def best_candidate(result: dict[str, Any]) -> dict[str, Any]:
    """A multimask result reduced to its candidate of highest predicted IoU (as a single-mask
    result: ``labels``, ``scores``, ``mask``, ``iou``, ``attention``); others as they are."""
    if "masks" not in result:
        return result
    j = int(np.argmax(result["iou"]))
    best = {k: v for k, v in result.items() if k != "masks"}
    best.update(labels=result["labels"][j], scores=result["scores"][j],
                mask=result["masks"][j], iou=result["iou"][j])  # fmt: skip
    if "attention" in result:
        best["attention"] = result["attention"][j]
    return best


def region_box(result: dict[str, Any]) -> list[float]:
    """The region's prompt box, else the box around its mask, else around its points."""
    if result.get("box") is not None:
        return result["box"]
    mask = result.get("mask")
    if mask is not None and mask.any():
        rows, cols = np.nonzero(mask)
        return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
    xy = np.asarray(result["point_coords"], dtype=np.float64)
    return [*xy.min(0).tolist(), *xy.max(0).tolist()]


def _named_regions(
    prompts: list[RegionPrompt],
    names: list[str],
    probs: Tensor,
    topk: int,
    masks: Tensor,
    iou: Tensor,
    attention: Tensor | None,
) -> list[dict[str, Any]]:
    """One result dict per prompt (see :meth:`Predictor.predict`): its ``topk`` best names,
    their probabilities, SAM's mask(s) and predicted IoU, and the attention if recorded."""
    k = min(topk, len(names))
    # stable sort: equal probabilities keep vocabulary order, as score_regions does
    top_p, top_i = probs.sort(dim=-1, descending=True, stable=True)
    top_p, top_i = top_p[..., :k].tolist(), top_i[..., :k].tolist()
    masks_np, iou_list = masks.cpu().numpy(), iou.cpu().tolist()
    multimask = masks_np.ndim == 4
    results = []
    for n, prompt in enumerate(prompts):
        result = prompt.describe()
        if multimask:
            result["labels"] = [[names[i] for i in row] for row in top_i[n]]
            result.update(scores=top_p[n], masks=masks_np[n], iou=iou_list[n])
        else:
            result["labels"] = [names[i] for i in top_i[n]]
            result.update(scores=top_p[n], mask=masks_np[n], iou=iou_list[n])
        if attention is not None:
            result["attention"] = attention[n].numpy()
        results.append(result)
    return results
