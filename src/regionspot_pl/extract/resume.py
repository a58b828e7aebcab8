"""The manifest an extraction writes, and resuming into a folder: a rerun continues only the
extraction that the folder already holds."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from ..backbones.build import segmenter_name
from ..backbones.clip import model_identity
from ..backbones.common import resolved_precision
from ..cache.manifest import MANIFEST, ClipBackbone, Manifest, SamBackbone
from ..cache.shards import ShardFormatError
from ..data.annotations import Vocabulary
from ..data.records import ReadStats
from .features import FeatureExtractor
from .settings import ExtractConfig, ExtractError


def file_digest(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, first 16 hex digits (backbone identity in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def previous_manifest(out: Path) -> Manifest | None:
    """The manifest of an extraction already in ``out`` (None when there is none); one this
    version cannot continue (another cache format or feature protocol, unreadable) is an error."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        return Manifest.read(out)
    except ShardFormatError as err:
        raise ExtractError(
            f"--out {out} holds an extraction this run cannot continue ({err}). "
            "Use another --out, or delete the folder to start over."
        ) from err


def build_manifest(
    cfg: ExtractConfig, vocab: Vocabulary, extractor: FeatureExtractor, read_stats: ReadStats
) -> Manifest:
    clip = extractor.encoder.vlm
    return Manifest(
        vocabulary=vocab,
        sam=SamBackbone(
            # a named type, or a SAM 2 config's file name (its full path is in `config`)
            type=segmenter_name(cfg.sam_type),
            checkpoint=str(Path(cfg.sam_checkpoint).resolve()),
            sha256_16=file_digest(cfg.sam_checkpoint),
            image_size=extractor.encoder.segmenter.image_size,
        ),
        clip=ClipBackbone(
            model=str(Path(cfg.clip_model).resolve()),
            id=model_identity(cfg.clip_model),
            image_size=clip.image_size,
            tokens=clip.num_tokens,
            vision_dim=clip.vision_dim,
            text_dim=clip.text_dim,
            logit_scale=clip.logit_scale,
        ),
        text_cache=str(Path(cfg.text_cache).resolve()),
        precision=resolved_precision(extractor.device, cfg.precision),
        dataset=cfg.dataset,
        annotations={
            "sha256_16": file_digest(cfg.annotations),
            "boxes_sha256_16": file_digest(cfg.boxes) if cfg.boxes else None,
            **read_stats.to_dict(),
        },
        config=asdict(cfg),
    )


def check_same_run(out: Path, manifest: Manifest) -> None:
    """Refuse to resume into a folder that holds a different extraction."""
    old = previous_manifest(out)
    if old is None:
        return
    diffs = [k for k in ExtractConfig.CONTENT_FIELDS if old.config.get(k) != manifest.config.get(k)]
    old_precision = old.precision if old.precision != "auto" else None
    if old_precision is not None and old_precision != manifest.precision:
        diffs.append(
            f"precision ({old_precision} -> {manifest.precision}; pass --precision {old_precision} to continue it)"
        )
    if old.sam.sha256_16 != manifest.sam.sha256_16:
        diffs.append("sam weights")
    if old.clip.id != manifest.clip.id:
        diffs.append("clip weights")
    for key, what in (("sha256_16", "annotation file content"), ("boxes_sha256_16", "proposals file content")):
        if old.annotations.get(key) != manifest.annotations[key]:
            diffs.append(what)
    if diffs:
        raise ExtractError(
            f"{out} already holds shards of a different extraction (differs in: {', '.join(diffs)}). "
            "Use another --out, or delete the folder to start over."
        )
