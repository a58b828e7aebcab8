"""Tiny random SigLIP and MetaCLIP 2 folders, in the official Hugging Face formats, for tests
and CPU smoke runs of the families other than CLIP (:mod:`.tiny` writes the tiny CLIP).

Each folder holds what a hub snapshot holds: config.json + model.safetensors (``save_pretrained``),
preprocessor_config.json (the family's image processor) and tokenizer.json +
tokenizer_config.json. Same seed, byte-identical files.

Tokenizers: SigLIP's own ``SiglipTokenizer`` is SentencePiece, whose model file is written and
read only with the ``sentencepiece`` (and ``protobuf``) packages; so that the tiny folders need
neither, the tiny SigLIP carries the tokenizer of the fixed-resolution SigLIP 2 checkpoints, which
are ``SiglipModel`` folders too: Gemma's byte-fallback BPE (``GemmaTokenizer``), which the
``tokenizers`` library writes as tokenizer.json. MetaCLIP 2 carries its own kind, an XLM-R
Unigram tokenizer (``XLMRobertaTokenizer``). Both vocabularies are single characters without
merges, so every character is one token.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    GemmaTokenizer,
    MetaClip2Config,
    MetaClip2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    XLMRobertaTokenizer,
)

from .positions import give_sincos_positions

TINY_SIGLIP_DIR = "siglip_tiny"
TINY_METACLIP2_DIR = "metaclip2_tiny"

_CHARACTERS = ["▁"] + [c for c in string.printable if not c.isspace()]  # SentencePiece's word mark first
_TOY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_TOY_VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's tokenizer layout (pad, eos, bos, unk, mask, the 256 byte-fallback tokens) over
    single characters; right padding to 64 with an end-of-sequence token appended, as SigLIP's
    text tower was trained (it pools the last position)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate(specials + byte_tokens + _CHARACTERS)}
    return GemmaTokenizer(
        vocab=vocab, merges=[], padding_side="right", model_max_length=64, add_bos_token=False, add_eos_token=True
    )


def tiny_xlmr_tokenizer() -> XLMRobertaTokenizer:
    """XLM-R's tokenizer layout (<s> 0, <pad> 1, </s> 2, <unk> 3, ..., <mask> last) over single
    characters, as MetaCLIP 2 ships it (Unigram, ``XLMRobertaTokenizer``)."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0) for c in _CHARACTERS] + [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=77)


def write_tiny_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny SigLIP (``SiglipModel``) at ``out_dir``: 256 input, patch 16 -> 1 + 16 x 16
    tokens (the pooled token, then the patches); vision width 128, text width 64 projected to 128
    (the vision width: SigLIP compares its pooled image feature with the projected text one).
    ``logit_scale`` log 10 and ``logit_bias`` -10, SigLIP's initial values."""
    path = Path(out_dir)
    tokenizer = tiny_gemma_tokenizer()
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    config = SiglipConfig(
        text_config=SiglipTextConfig(
            **_TOY_TEXT, **ids, vocab_size=len(tokenizer), max_position_embeddings=64, projection_size=128
        ),
        vision_config=SiglipVisionConfig(**_TOY_VISION, image_size=256, patch_size=16),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    give_sincos_positions(model.vision_model.embeddings)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    SiglipImageProcessor(size={"height": 256, "width": 256}).save_pretrained(path)  # mean = std = 0.5
    return path


def write_tiny_metaclip2(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny MetaCLIP 2 (``MetaClip2Model``) at ``out_dir``: the tiny CLIP's geometry (224
    input, patch 16 -> 197 tokens, vision width 128, text width 64, joint dim 64, logit scale
    100), an XLM-R tokenizer (end-of-text id 2, as in the released weights) and CLIP's image
    processor (CLIP's mean and std, as MetaCLIP 2 ships)."""
    path = Path(out_dir)
    tokenizer = tiny_xlmr_tokenizer()
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    config = MetaClip2Config(
        text_config={**_TOY_TEXT, **ids, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
        vision_config={**_TOY_VISION, "image_size": 224, "patch_size": 16},
        projection_dim=64,
        logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(seed)
    model = MetaClip2Model(config)
    give_sincos_positions(model.vision_model.embeddings)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


__all__ = [
    "TINY_METACLIP2_DIR",
    "TINY_SIGLIP_DIR",
    "tiny_gemma_tokenizer",
    "tiny_xlmr_tokenizer",
    "write_tiny_metaclip2",
    "write_tiny_siglip",
]
