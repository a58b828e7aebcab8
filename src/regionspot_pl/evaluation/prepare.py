"""Steps 1 and 2 of a test run (:mod:`.zero_shot`; its settings: :mod:`.settings`): every input
read and checked before any model runs (:func:`resolve_inputs`), then the models and the
vocabulary's text embeddings (:func:`build_models`).

The annotation file is read by the package's one reader and held to the shards by the one check
(:mod:`regionspot_pl.data.annotations`): it must name every class of the shards and hold every
image they hold.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..backbones.build import LazyTextEncoder, load_vlm
from ..backbones.clip import model_identity, text_embeddings
from ..backbones.common import resolve_device
from ..backbones.interfaces import VisionLanguageModel
from ..cache.manifest import ShardFolder
from ..data.annotations import GroundTruth, Vocabulary, check_classes, check_images, read_ground_truth
from ..model.checkpoint import CheckpointError, load_head
from ..model.head import RegionSpotHead, check_head_backbones, check_head_fits
from .baselines import BASELINES
from .settings import TestConfig, TestError

# --------------------------------------------------------------------------------------------
# Step 1: inputs, read and checked before any model runs
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A run's checked inputs."""

    config: TestConfig
    folder: ShardFolder
    gt: GroundTruth
    vocab: Vocabulary
    device: torch.device
    has_masks: bool  # the shards hold a SAM mask per box (not extracted with --masks false)
    shard_image_ids: set[int] | None  # None for streamed shards (known only once read)
    images: str | None  # the original images (baselines only)
    clip_dir: str  # the CLIP of the text side (and of the crops)

    @property
    def same_clip(self) -> bool:
        """The text side is the CLIP the shards' features came from."""
        model = self.folder.clip.model
        return not self.config.clip_model or Path(self.clip_dir).resolve() == Path(model).resolve()


def resolve_inputs(config: TestConfig) -> Inputs:
    """Every file of the run read and checked, so that a bad one fails before the models load."""
    folder = ShardFolder.read(config.shards)
    extraction = folder.manifest.config
    has_masks = extraction.get("masks", True) is not False
    if config.method == "clip-mask" and not has_masks:
        raise TestError(
            f"clip-mask needs the SAM masks, but the shards in {folder.folder} were extracted with --masks false: "
            "re-extract them with masks, or use --method clip-box"
        )
    gt = read_ground_truth(config.annotations)
    check_classes(gt, folder.vocabulary, folder.folder)
    shard_ids = folder.image_ids()
    if shard_ids is not None:  # streamed shards: checked once their images are known
        note_uncovered(gt, shard_ids, folder.folder)
    return Inputs(
        config=config,
        folder=folder,
        gt=gt,
        vocab=vocabulary(gt, config.vocab),
        device=resolve_device(config.device),
        has_masks=has_masks,
        shard_image_ids=shard_ids,
        images=_image_folder(config, extraction),
        clip_dir=_clip_dir(config, folder),
    )


def vocabulary(gt: GroundTruth, vocab_file: str | None = None) -> Vocabulary:
    """The test vocabulary: the annotation file's categories in id order (as the shards use).

    ``vocab_file`` (one class name per line) renames them, e.g. to try other prompts; it must
    list exactly one name per category, in category-id order.
    """
    if not vocab_file:
        return gt.vocab
    path = Path(vocab_file)
    if not path.is_file():
        raise TestError(f"vocabulary file not found: {path} (--vocab takes a text file, one class name a line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(gt.vocab):
        raise TestError(
            f"--vocab {path} lists {len(names)} class names but {gt.path} has {len(gt.vocab)} categories: "
            "the file must give one name per category, in the order of the category ids "
            f"({gt.vocab.category_ids[0]}: {gt.vocab.names[0]!r}, ...)"
        )
    return dataclasses.replace(gt.vocab, names=tuple(names))


def note_uncovered(gt: GroundTruth, image_ids: set[int], folder: str) -> None:
    """The shards' images must all be in the ground truth (:func:`check_images`); GT images the
    shards lack are told (their objects count as missed)."""
    uncovered = check_images(gt, image_ids, folder)
    if uncovered:
        print(
            f"note: the shards cover {len(image_ids)} of the {len(gt.images)} images of {gt.path}; "
            "objects in the others count as missed"
        )


def _image_folder(config: TestConfig, extraction: dict) -> str | None:
    """The baselines' original images: --images, or the folder the shards were extracted from."""
    if config.method not in BASELINES:
        return None
    images = str(config.images or extraction.get("images") or "")
    if not images or not Path(images).is_dir():
        raise TestError(
            f"image folder {images or '(none)'} not found: the {config.method} baseline crops the original "
            "images; pass --images DIR (the folder the shards were extracted from)"
        )
    return images


def _clip_dir(config: TestConfig, folder: ShardFolder) -> str:
    """The text side's CLIP: the one the shards were extracted with, unless --clip_model names another."""
    clip_dir = str(config.clip_model or folder.clip.model)
    if config.method in BASELINES and not Path(clip_dir).is_dir():
        raise TestError(
            f"CLIP folder not found: {clip_dir} (the {config.method} baseline embeds the crops with CLIP: "
            "pass --clip_model DIR, a Hugging Face CLIP snapshot)"
        )
    return clip_dir


# --------------------------------------------------------------------------------------------
# Step 2: the models (head or CLIP) and the vocabulary's text embeddings
# --------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The head (regionspot) or the CLIP image tower (baselines), and the text embeddings [C, D]."""

    head: RegionSpotHead | None
    encoder: VisionLanguageModel | None
    texts: Tensor


def build_models(inputs: Inputs) -> Models:
    """Load the head (checked against the shards' CLIP and the text side before any text is
    encoded) or the baseline's CLIP, then embed the vocabulary (through the text cache)."""
    config, clip = inputs.config, inputs.folder.clip
    model_id = clip.id if inputs.same_clip else model_identity(inputs.clip_dir)
    head = encoder = None
    if config.method == "regionspot":
        if model_id != clip.id:
            print(f"note: text embeddings from {inputs.clip_dir}, not the CLIP of the shards' features ({clip.model})")
        head = _load_head(config.head, inputs.device)
        # the pair it was trained on, once; then its widths (the text width again once texts exist)
        shards = f"the shards' {clip.model}"
        check_head_backbones(
            head.backbones, inputs.folder.manifest.sam.type, clip.id, shards, f"the head {config.head}"
        )
        _check_head(head, inputs, clip.text_dim if inputs.same_clip else _config_text_dim(inputs.clip_dir))
    else:
        encoder = load_vlm(inputs.clip_dir).to(inputs.device)
    text_encoder = encoder if encoder is not None else LazyTextEncoder(inputs.clip_dir, inputs.device)
    cache = str(config.text_cache or inputs.folder.manifest.text_cache)
    texts = text_embeddings(text_encoder, list(inputs.vocab.names), cache, model_id)
    if head is not None:
        _check_head(head, inputs, texts.shape[1])
    return Models(head, encoder, texts)


def _load_head(path: str, device: torch.device) -> RegionSpotHead:
    try:
        return load_head(path, map_location=device)
    except CheckpointError as err:  # the same error, naming the flag the file came from
        raise TestError(f"--head {path}: {err}") from err


def _check_head(head: RegionSpotHead, inputs: Inputs, text_dim: int | None) -> None:
    """The head against the shards' CLIP features and the text side (``text_dim`` None: unknown
    before the texts are encoded, checked then)."""
    clip = inputs.folder.clip
    if inputs.same_clip:
        clip_name = f"the shards' CLIP ({clip.model})"
    else:
        clip_name = f"the shards' CLIP features ({clip.model}) with the text side of --clip_model {inputs.clip_dir}"
    text_dim = head.config.text_dim if text_dim is None else text_dim
    check_head_fits(head.config, clip.vision_dim, text_dim, clip_name, f"the head {inputs.config.head}")


def _config_text_dim(clip_dir: str) -> int | None:
    """A CLIP snapshot's joint embedding dim from its config.json, None when unreadable."""
    try:
        return int(json.loads((Path(clip_dir) / "config.json").read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load_clip / model_identity will say what is wrong with the folder
