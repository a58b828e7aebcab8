"""Tiny random backbones for tests and CPU smoke runs, in the real ones' file formats.

``sam_tiny.pth`` is a state dict for ``build_sam('tiny', path)``; ``clip_tiny/`` is a Hugging
Face CLIP snapshot (config, safetensors weights, a real byte-level BPE CLIPTokenizer built from a
generated vocabulary) that ``load_clip`` reads offline; ``siglip_tiny/`` and ``metaclip2_tiny/``
come from :mod:`.tiny_vlm`. Same seed, byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .positions import give_sincos_positions, sincos_position_embedding_2d
from .sam import OFFICIAL_SAM_CHECKPOINTS, build_tiny_sam
from .tiny_sam2 import TINY_SAM2_CHECKPOINT, TINY_SAM2_CONFIG, write_tiny_sam2
from .tiny_vlm import TINY_METACLIP2_DIR, TINY_SIGLIP_DIR, write_tiny_metaclip2, write_tiny_siglip

TINY_CLIP_DIR = "clip_tiny"

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over bytes only: CLIP's vocabulary layout (256 byte symbols, their
    '</w>' word-final variants, then the two special tokens) without any merges, so every
    character is one token. Real CLIPTokenizer code, no hub access."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> CLIPConfig:
    """ViT-B/16-shaped geometry (224 input, patch 16 -> 197 tokens) at toy width and depth."""
    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            # the pooled text feature is taken at the first eos id (HF CLIPTextTransformer)
            "eos_token_id": eos_token_id,
            "bos_token_id": bos_token_id,
            "pad_token_id": eos_token_id,
        },
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=64,
        # trained CLIPs end at the clamp exp(logit_scale) = 100, which RegionSpot's head reuses
        logit_scale_init_value=math.log(100.0),
    )


def tiny_backbone_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`write_tiny_backbones` writes each model under ``out_dir`` (its return value)."""
    out = Path(out_dir)
    return {
        "sam_checkpoint": out / OFFICIAL_SAM_CHECKPOINTS["tiny"],
        "clip_dir": out / TINY_CLIP_DIR,
        "siglip_dir": out / TINY_SIGLIP_DIR,
        "metaclip2_dir": out / TINY_METACLIP2_DIR,
        "sam2_checkpoint": out / TINY_SAM2_CHECKPOINT,
        "sam2_config": out / TINY_SAM2_CONFIG,
    }


# family name -> the tiny model's key in tiny_backbone_paths (the demo's --sam and --clip choices)
TINY_SAMS = {"sam": "sam_checkpoint", "sam2.1": "sam2_checkpoint"}
TINY_VLMS = {"clip": "clip_dir", "siglip": "siglip_dir", "metaclip2": "metaclip2_dir"}


def tiny_pair(out_dir: str | Path, sam: str = "sam", vlm: str = "clip") -> dict[str, str]:
    """``sam_type``, ``sam_checkpoint`` and ``clip_model`` of the tiny models of these families
    under ``out_dir`` (``sam`` a key of ``TINY_SAMS``, ``vlm`` of ``TINY_VLMS``)."""
    paths = tiny_backbone_paths(out_dir)
    sam_type = "tiny" if sam == "sam" else str(paths["sam2_config"])
    return {
        "sam_type": sam_type,
        "sam_checkpoint": str(paths[TINY_SAMS[sam]]),
        "clip_model": str(paths[TINY_VLMS[vlm]]),
    }


def write_tiny_backbones(out_dir: str | Path, seed: int = 0, sam_image_size: int | None = None) -> dict[str, Path]:
    """Write random tiny SAM and CLIP weights under ``out_dir``, and tiny SigLIP and MetaCLIP 2
    folders (:mod:`.tiny_vlm`); the tiny SAM's input is ``sam_image_size`` (a multiple of 16;
    default ``TINY_SAM_CONFIG["image_size"]``).

    Returns:
        :func:`tiny_backbone_paths`: {"sam_checkpoint": out_dir/sam_tiny.pth, "clip_dir": out_dir/clip_tiny,
        "siglip_dir": out_dir/siglip_tiny, "metaclip2_dir": out_dir/metaclip2_tiny,
        "sam2_checkpoint": out_dir/sam2.1_hiera_tiny_random.pt, "sam2_config": out_dir/sam2.1_hiera_tiny_random.yaml}
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = tiny_backbone_paths(out)
    sam_path, clip_dir = paths["sam_checkpoint"], paths["clip_dir"]

    torch.manual_seed(seed)
    sam = build_tiny_sam(sam_image_size) if sam_image_size else build_tiny_sam()
    # contiguous clones: saved storages then hold exactly each tensor's bytes
    torch.save({k: v.detach().clone().contiguous() for k, v in sam.state_dict().items()}, sam_path)

    tokenizer = tiny_clip_tokenizer()
    config = tiny_clip_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    torch.manual_seed(seed + 1)
    clip = CLIPModel(config)
    give_sincos_positions(clip.vision_model.embeddings)
    clip.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    write_tiny_siglip(paths["siglip_dir"], seed + 2)
    write_tiny_metaclip2(paths["metaclip2_dir"], seed + 3)
    write_tiny_sam2(out, seed=seed + 4)  # its two files, named as tiny_backbone_paths names them
    return paths


__all__ = [
    "TINY_CLIP_DIR",
    "sincos_position_embedding_2d",
    "tiny_clip_config",
    "TINY_SAMS",
    "TINY_VLMS",
    "tiny_backbone_paths",
    "tiny_pair",
    "tiny_clip_tokenizer",
    "write_tiny_backbones",
]
