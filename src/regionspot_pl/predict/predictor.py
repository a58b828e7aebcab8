"""The predictor: name any region of one image with a trained RegionSpot head.

:class:`Predictor` holds a :class:`~regionspot_pl.backbones.encoder.RegionEncoder` (frozen SAM +
CLIP) and a head; ``set_image`` computes an image's features once, then ``predict`` names
regions given as SAM prompts in pixels of the original image: boxes, points (1 foreground, 0
background), or both (region i is box i with the points of region i). ``python -m
regionspot_pl.predict`` is its command line.

The predictor's features come from the encoder ``python -m regionspot_pl.extract`` uses (same
preprocessing, same autocast, CLIP and SAM tokens rounded to float16 as the cache stores them),
so its probabilities equal those of the batch path for the same image and boxes.

Bad input a user can give (an unreadable image, a box outside it, malformed points, an empty
vocabulary, a head that does not fit the CLIP) raises a :class:`~regionspot_pl.errors.RegionSpotError`
subclass naming what is wrong (:mod:`regionspot_pl.predict.prompts` checks the inputs).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..backbones.build import load_segmenter, load_vlm, segmenter_name
from ..backbones.clip import model_identity, text_embeddings
from ..backbones.common import DEFAULT_TEXT_CACHE
from ..backbones.encoder import ImageFeatures, RegionEncoder
from ..backbones.interfaces import VisionLanguageModel
from ..model import RegionSpotHead, load_head, region_logits
from ..model.head import check_head_backbones, check_head_fits
from .prompts import (
    BoxesLike,
    ImageLike,
    PointsLike,
    PromptError,
    RegionPrompt,
    VocabularyLike,
    grouped_prompts,
    load_image,
    read_vocabulary,
    region_prompts,
)
from .results import named_regions

# Prompts per SAM decoder call: it repeats the image embedding per prompt, so a bound keeps
# "name everything" (hundreds of masks) within memory on a small machine.
PROMPTS_PER_CALL = 64


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


def _check_head_fits(head: RegionSpotHead, vlm: VisionLanguageModel, head_name: str, clip_name: str) -> None:
    """The head's CLIP width and text dim must be the CLIP model's (a BL head needs ViT-L/14)."""
    check_head_fits(head.config, vlm.vision_dim, vlm.text_dim, clip_name, head_name)


class Predictor:
    """A region encoder (frozen SAM + CLIP) and a trained head: set an image once, then name
    any of its regions (boxes, points, or both, as SAM takes them).

    Attributes:
        head: the head, in eval mode on the encoder's device.
        encoder: the :class:`~regionspot_pl.backbones.encoder.RegionEncoder`.
        clip_grid: side of CLIP's patch grid (14 for ViT-B/16 at 224); tokens T = 1 + grid^2.
        image: the current image, HxWx3 uint8 (None before ``set_image``).
        texts: text embeddings [C, text_dim] kept in memory by vocabulary (the tuple of its names);
            a vocabulary missing there is read from (or written to) the HDF5 ``text_cache``.
    """

    def __init__(
        self,
        head: RegionSpotHead,
        encoder: RegionEncoder,
        clip_id: str,
        text_cache: str | Path | None = None,
        texts: MutableMapping[tuple[str, ...], Tensor] | None = None,
    ) -> None:
        """``texts``: the in-memory text embeddings to use (default: a dict of its own, which keeps
        every vocabulary asked for; a bounded mapping bounds that memory)."""
        _check_head_fits(head, encoder.vlm, "the head", "the CLIP model")
        self.encoder = encoder
        self.device = encoder.device
        self.head = head.to(self.device).eval()
        self.clip_id = clip_id
        self.text_cache = Path(text_cache if text_cache is not None else DEFAULT_TEXT_CACHE)
        self.clip_grid: int = encoder.vlm.grid
        self.image: np.ndarray | None = None
        self._features: ImageFeatures | None = None
        self.texts: MutableMapping[tuple[str, ...], Tensor] = {} if texts is None else texts

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
        clip = load_vlm(clip_model)
        # before SAM is built (which can take a while for the real models): the pair the head was
        # trained on, then the widths it reads
        clip_id = model_identity(clip_model)
        check_head_backbones(head_module.backbones, segmenter_name(sam_type), clip_id, str(clip_model), f"head {head}")
        _check_head_fits(head_module, clip, f"head {head}", f"the CLIP model in {clip_model}")
        segmenter = load_segmenter(sam_type, sam_checkpoint)
        encoder = RegionEncoder(segmenter, clip, device, precision, max_prompts_per_call=PROMPTS_PER_CALL)
        return cls(head_module, encoder, clip_id, text_cache)

    # ----------------------------------------------------------------------------------- image
    def set_image(self, image: ImageLike, features: ImageFeatures | None = None) -> None:
        """Compute the SAM image embedding and the CLIP feature map of ``image``, once
        (``RegionEncoder.embed``, as extraction does); later ``predict`` calls only run SAM's
        prompt encoder + mask decoder and the head.

        ``features``: this image's features when the caller has them already (``self.encoder.embed``
        on a batch of images, or kept from an earlier call); then no encoder runs.
        """
        pixels = load_image(image)
        if features is None:
            features = self.encoder.embed([self.encoder.image_input(pixels)])[0]
        elif tuple(features.original_size) != pixels.shape[:2]:
            raise ValueError(f"features of a {features.original_size} image given for a {pixels.shape[:2]} image")
        self._features = features
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
        """SAM on N prompts (original pixels) through the encoder, as extraction does.

        Prompts alike in :attr:`RegionPrompt.signature` share one decoder call; the others are
        decoded separately, since SAM batches only prompts with the same number of points.

        Returns:
            tokens [N, 256] (multimask: [N, 3, 256]) float32, read back from float16 as the
            cache stores them; masks [N, H, W] bool at the original size ([N, 3, H, W]); iou
            [N] ([N, 3]).
        """
        assert self._features is not None
        parts = [
            (indices, self.encoder.decode([self._features], [group], multimask)[0])
            for indices, group in grouped_prompts(prompts)
        ]
        outputs = []
        for field in ("tokens", "masks", "iou"):  # each back in the order of the prompts
            first = getattr(parts[0][1], field)
            out = first.new_empty((len(prompts), *first.shape[1:]))
            for indices, regions in parts:
                out[torch.as_tensor(indices, device=out.device)] = getattr(regions, field)
            outputs.append(out)
        return outputs[0].float(), outputs[1], outputs[2]

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
        assert self._features is not None
        hook = _CrossAttentionRecorder(self.head, layer) if with_attention else None
        try:
            embeddings = self.head(tokens[None].to(self.device), self._features.image_tokens.float()[None])[0]
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
        if key not in self.texts:
            self.texts[key] = text_embeddings(self.encoder.vlm, names, self.text_cache, self.clip_id)
        return self.texts[key]

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
        return_embeddings: bool = False,
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
            return_embeddings: add ``"embedding"``: the region's :meth:`region_embeddings` row,
                [text_dim] float32 ([3, text_dim] with ``multimask_output``), from the same
                decoder and head pass as the names.

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
        texts = self._text(names).to(embeddings.device)
        probs = region_logits(embeddings, texts, self.head.config.logit_scale).softmax(-1)
        unit = _unit(embeddings) if return_embeddings else None
        return named_regions(prompts, names, probs.cpu(), topk, masks, iou, attention, unit)

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
        return _unit(embeddings)

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
            return torch.zeros(0, self.encoder.vlm.num_tokens)
        tokens, _, _ = self._prompt_tokens(prompts)
        _, attention = self._run_head(tokens, with_attention=True, layer=layer)
        assert attention is not None
        return attention


def _unit(embeddings: Tensor) -> Tensor:
    """Region embeddings [..., text_dim] -> L2-normalized float32 on the CPU."""
    return F.normalize(embeddings.float(), dim=-1, eps=1e-7).cpu()
