"""Name any boxes of one image with a trained RegionSpot head, and draw the result.

    python -m regionspot_pl.predict --image IMG --boxes "x1,y1,x2,y2;..." --vocab "cat,dog" \
        --head HEAD.pt --sam-type vit_b --sam-checkpoint sam_vit_b_01ec64.pth \
        --clip-model DIR --out OUT.png [--topk 3] [--device cpu]

``--vocab`` is a file (one class name a line) if that path exists, else comma-separated names.
Writes a picture (boxes, top label + probability, SAM mask) and prints JSON, one entry per box.

The :class:`Predictor` computes features exactly as ``python -m regionspot_pl.extract`` does
(same preprocessing, same autocast, CLIP and SAM tokens rounded through float16 as the cache
stores them), so its probabilities equal those of the batch path for the same image and boxes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .backbones.clip import ClipEncoder, clip_preprocess, load_clip, model_identity, text_embeddings
from .backbones.image import (
    ImageReadError,
    masks_to_original,
    pil_to_rgb,
    read_image,
    resize_for_backbones,
    scale_boxes,
)
from .backbones.sam import OFFICIAL_SAM_CHECKPOINTS, SAM_TYPES, SamRegionEncoder, build_sam
from .extract import DEFAULT_TEXT_CACHE, autocast_for
from .model import RegionSpotHead, load_head, region_logits

ImageLike = str | Path | Image.Image | np.ndarray
BoxesLike = Sequence[Sequence[float]] | np.ndarray | Tensor
VocabularyLike = Sequence[str] | str | Path

# Boxes from annotation files are floats that may end a rounding error past the border.
_BORDER_TOLERANCE = 1e-3


def load_image(image: ImageLike) -> np.ndarray:
    """A path, PIL image or HxWx3 uint8 array -> HxWx3 uint8 RGB array.

    Files are decoded as the extractor decodes them (``backbones.image.read_image``: EXIF
    orientation applied); PIL images and arrays are taken as they are.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            return read_image(path)[0]
        except ImageReadError as err:
            raise ValueError(str(err)) from err
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image array must be HxWx3 uint8 RGB, got {image.dtype} {image.shape}; "
                "convert with np.asarray(PIL.Image.open(f).convert('RGB'))"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image array is empty: {image.shape}")
        return np.ascontiguousarray(image)
    raise TypeError(
        f"image must be a path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}"
    )


def check_boxes(boxes: BoxesLike, image_size: tuple[int, int]) -> Tensor:
    """Validate xyxy pixel boxes against an image of (H, W); returns them as [N, 4] float32.

    Raises ValueError naming the first offending box and the image size.
    """
    height, width = image_size
    try:
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"boxes must be numbers [[x1, y1, x2, y2], ...], got {boxes!r}") from err
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim == 1 and t.shape[0] == 4:
        t = t[None]  # one box given flat
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy pixels, got shape {tuple(t.shape)}")
    tol = _BORDER_TOLERANCE
    for i, (x1, y1, x2, y2) in enumerate(t.tolist()):
        where = f"box {i} [{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        if not all(np.isfinite([x1, y1, x2, y2])):
            raise ValueError(f"{where} has a non-finite coordinate")
        if x2 <= x1 or y2 <= y1:
            raise ValueError(
                f"{where} is not x1,y1,x2,y2 with x2 > x1 and y2 > y1 (boxes are corners in "
                "pixels, not x,y,w,h)"
            )
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise ValueError(
                f"{where} is outside the image of {width}x{height} (W x H); coordinates must "
                f"lie in [0, {width}] x [0, {height}]"
            )
    return t


def read_vocabulary(vocabulary: VocabularyLike) -> list[str]:
    """Class names from a list, or from a text file (one name a line, blank lines skipped)."""
    if isinstance(vocabulary, (str, Path)):
        path = Path(vocabulary)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocabulary file not found: {path} (pass a list of names, or a text file with "
                "one class name a line)"
            )
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        source = str(path)
    else:
        names = [str(n).strip() for n in vocabulary]
        source = "the vocabulary"
        if any(not n for n in names):
            raise ValueError(f"{source} holds an empty class name: {list(vocabulary)!r}")
    if not names:
        raise ValueError(f"{source} is empty: give at least one class name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        # Softmax over a repeated name splits its probability between the copies.
        raise ValueError(f"{source} repeats class names {duplicates}; list each class once")
    return names


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


def check_head_fits_clip(head: RegionSpotHead, clip: ClipEncoder, head_name: str = "the head",
                         clip_where: str = "") -> None:
    """The head's CLIP width and text dim must be the CLIP model's (a BL head needs ViT-L/14)."""
    cfg = head.config
    if (cfg.clip_dim, cfg.text_dim) != (clip.vision_dim, clip.text_dim):
        raise ValueError(
            f"{head_name} (clip_dim {cfg.clip_dim}, text_dim {cfg.text_dim}) does not fit the CLIP "
            f"model{clip_where} (vision width {clip.vision_dim}, text dim {clip.text_dim}); use the "
            "CLIP the head was trained with (BB: ViT-B/16, BL: ViT-L/14)"
        )


class Predictor:
    """Frozen SAM + CLIP + a trained head: set an image once, then name any of its boxes.

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
        check_head_fits_clip(head, clip)
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
        """Load the head file, SAM (``sam_type`` + checkpoint) and a local CLIP directory.

        ``text_cache``: HDF5 file of text embeddings (default ``cache/text_embeddings.h5``, the
        extractor's). ``precision``: autocast as in extraction (auto = fp32 on CPU).
        """
        head_module = load_head(head)
        clip_model_hf, tokenizer = load_clip(clip_model)
        clip = ClipEncoder(clip_model_hf, tokenizer)
        # before building SAM, which can take a while for the real models
        check_head_fits_clip(head_module, clip, f"head {head}", f" in {clip_model}")
        sam = SamRegionEncoder(build_sam(sam_type, sam_checkpoint))
        return cls(
            head_module, sam, clip, model_identity(clip_model), device, text_cache, precision
        )

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
        if self.image is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")
        return int(self.image.shape[0]), int(self.image.shape[1])

    # ----------------------------------------------------------------------------------- boxes
    @torch.inference_mode()
    def _region_tokens(self, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """[N, 4] checked boxes (original pixels) -> (SAM tokens [N, 256] float16-rounded,
        masks [N, H, W] at the original size), through the resized image as extraction does."""
        assert self._sam_embedding is not None
        boxes = scale_boxes(boxes.to(self.device), self.image_size, self._resized_size)
        with autocast_for(self.device, self.precision):
            tokens, masks = self.sam.encode_boxes(self._sam_embedding, boxes, self._resized_size)
        masks = masks_to_original(masks, self.image_size)
        # The cache stores SAM tokens in float16 too (the batch path reads them back as float32).
        return tokens.float().half().float(), masks

    @torch.inference_mode()
    def _run_head(
        self, tokens: Tensor, with_attention: bool, layer: int = -1
    ) -> tuple[Tensor, Tensor | None]:
        """Region tokens [N, 256] -> (embeddings [N, text_dim], attention of ``layer`` [N, T] or None)."""
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
        boxes: BoxesLike,
        vocabulary: VocabularyLike,
        topk: int = 5,
        return_attention: bool = False,
    ) -> list[dict[str, Any]]:
        """Name each box of the current image.

        The boxes of one call are the queries of one image and attend to each other in the
        head's self-attention, as all boxes of an image do in training and in the batch path:
        a box's scores therefore depend on the other boxes passed with it.

        Args:
            boxes: [N, 4] x1, y1, x2, y2 in pixels of the image given to ``set_image``.
            vocabulary: class names, or a text file with one name a line.
            topk: labels kept per box (clamped to the vocabulary size).
            return_attention: add ``"attention"``: [T] float32, the last decoder layer's
                cross-attention of the box's query over CLIP tokens (class token first),
                averaged over heads.

        Returns:
            one dict per box: ``box`` [4] floats, ``labels`` [k] names and ``scores`` [k]
            probabilities (softmax over the whole vocabulary), best first; ``mask`` HxW bool
            numpy array (SAM's box-prompted mask).
        """
        if self.image is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        names = read_vocabulary(vocabulary)
        checked = check_boxes(boxes, self.image_size)
        if len(checked) == 0:
            return []
        tokens, masks = self._region_tokens(checked)
        embeddings, attention = self._run_head(tokens, return_attention)
        probs = region_logits(embeddings, self._text(names).to(embeddings.device)).softmax(-1)
        k = min(topk, len(names))
        # stable sort: equal probabilities keep vocabulary order, as score_regions does
        top_p, top_i = probs.cpu().sort(dim=-1, descending=True, stable=True)
        results = []
        masks_np = masks.cpu().numpy()
        for n in range(len(checked)):
            result: dict[str, Any] = {
                "box": [float(v) for v in checked[n].tolist()],
                "labels": [names[i] for i in top_i[n, :k].tolist()],
                "scores": [float(p) for p in top_p[n, :k].tolist()],
                "mask": masks_np[n],
            }
            if attention is not None:
                result["attention"] = attention[n].numpy()
            results.append(result)
        return results

    def attention_maps(self, boxes: BoxesLike, layer: int = -1) -> Tensor:
        """[N, T] cross-attention of each box's query in decoder layer ``layer`` (default the
        last; mean over heads), over the CLIP tokens of the current image, class token first;
        rows sum to 1."""
        if self.image is None:
            raise RuntimeError("no image set: call predictor.set_image(image) first")
        checked = check_boxes(boxes, self.image_size)
        if len(checked) == 0:
            return torch.zeros(0, self.clip.num_tokens)
        tokens, _ = self._region_tokens(checked)
        _, attention = self._run_head(tokens, with_attention=True, layer=layer)
        assert attention is not None
        return attention


# ------------------------------------------------------------------------------------------ CLI
def parse_boxes(text: str) -> list[list[float]]:
    """'x1,y1,x2,y2;x1,y1,x2,y2' -> [[x1, y1, x2, y2], ...]."""
    boxes = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        values = part.split(",")
        try:
            box = [float(v) for v in values]
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(
                f"--boxes entry {i} {part.strip()!r} is not four numbers x1,y1,x2,y2; "
                'separate boxes with ";", e.g. --boxes "10,10,80,90;100,20,180,120"'
            )
        boxes.append(box)
    if not boxes:
        raise ValueError('--boxes is empty; give at least one box "x1,y1,x2,y2"')
    return boxes


def parse_vocab(text: str) -> list[str] | Path:
    """--vocab: an existing file path, else comma-separated class names."""
    if Path(text).is_file():
        return Path(text)
    return [name.strip() for name in text.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regionspot_pl.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--boxes", required=True, help='boxes in pixels: "x1,y1,x2,y2;x1,y1,x2,y2"')
    p.add_argument("--vocab", required=True, help="class-name file (one a line) or 'cat,dog,...'")
    p.add_argument("--head", required=True, help="head checkpoint (save_head / convert output)")
    p.add_argument("--sam-type", required=True, choices=SAM_TYPES)
    p.add_argument(
        "--sam-checkpoint", required=True, help="e.g. " + OFFICIAL_SAM_CHECKPOINTS["vit_b"]
    )
    p.add_argument("--clip-model", required=True, help="local Hugging Face CLIP folder")
    p.add_argument("--out", required=True, help="picture to write (PNG)")
    p.add_argument("--attention-out", help="also write the boxes' attention maps (PNG grid)")
    p.add_argument("--topk", type=int, default=3, help="labels per box (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--text-cache", default=DEFAULT_TEXT_CACHE, help="HDF5 text-embedding cache")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from . import viz  # matplotlib is needed only here

    hf_logging.disable_progress_bar()  # keep stderr for our own errors

    try:
        if args.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {args.topk}")
        boxes = parse_boxes(args.boxes)
        vocab = parse_vocab(args.vocab)
        image = load_image(args.image)  # fail on a bad image before loading any model
        check_boxes(boxes, image.shape[:2])
        read_vocabulary(vocab)
        predictor = Predictor.from_pretrained(
            args.head, args.sam_type, args.sam_checkpoint, args.clip_model,
            device=args.device, text_cache=args.text_cache,
        )  # fmt: skip
        predictor.set_image(image)
        results = predictor.predict(
            boxes, vocab, topk=args.topk, return_attention=bool(args.attention_out)
        )
        picture = viz.draw_detections(
            image,
            [r["box"] for r in results],
            [r["labels"][0] for r in results],
            [r["scores"][0] for r in results],
            masks=[r["mask"] for r in results],
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out)
        if args.attention_out:
            maps = [
                viz.draw_attention(image, r["box"], r["attention"], predictor.clip_grid,
                                   title=f"box {i}: {r['labels'][0]}")
                for i, r in enumerate(results)
            ]  # fmt: skip
            viz.save_grid(maps, args.attention_out, cols=min(4, len(maps)))
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # one box a line: parseable as a whole, readable by eye
    rows = [json.dumps({k: r[k] for k in ("box", "labels", "scores")}) for r in results]
    print("[\n" + ",\n".join(rows) + "\n]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
