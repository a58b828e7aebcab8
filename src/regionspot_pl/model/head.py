"""The RegionSpot head: the only trained part of RegionSpot.

Each region's position-aware SAM token becomes a query that cross-attends to the frozen CLIP
feature map of its image; the result is projected into CLIP's text space, where it is compared
with text embeddings of class names. Parameter names equal those of the official checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import RegionSpotError
from .pretrained import HeadFolderMixin


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of a RegionSpot head. Defaults are RegionSpot-BL (SAM ViT-B + CLIP ViT-L/14)."""

    sam_dim: int = 256
    clip_dim: int = 1024
    text_dim: int = 768
    depth: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    use_class_token: bool = True
    # the temperature of its logits: the frozen vision-language model's exp(logit_scale), which
    # fit takes from the shards (100 for CLIP; SigLIP learns its own)
    logit_scale: float = 100.0

    def to_dict(self) -> dict:
        return asdict(self)


# The published variants. BL and BL@336 share the head sizes; they differ in the CLIP input size
# (257 vs 577 cached tokens), which the head does not depend on.
VARIANTS: dict[str, HeadConfig] = {
    "BB": HeadConfig(clip_dim=768, text_dim=512),
    "BL": HeadConfig(clip_dim=1024, text_dim=768),
    "BL@336": HeadConfig(clip_dim=1024, text_dim=768),
}
VARIANT_CLIP_SIZE = {"BB": 224, "BL": 224, "BL@336": 336}
VARIANT_CLIP = {"BB": "ViT-B/16", "BL": "ViT-L/14", "BL@336": "ViT-L/14@336"}
AUTO = "auto"


class HeadMismatchError(RegionSpotError):
    """A head does not fit the CLIP features or text embeddings it is given."""


def infer_variant(config: HeadConfig) -> str | None:
    """Name of the published variant whose sizes match, or None (BL@336 is reported as BL)."""
    for name in ("BB", "BL"):
        ref = VARIANTS[name]
        if (config.clip_dim, config.text_dim, config.depth) == (ref.clip_dim, ref.text_dim, ref.depth):
            return name
    return None


def variant_for_clip(vision_dim: int, text_dim: int, image_size: int | None = None) -> str | None:
    """The published variant made for a CLIP of these sizes, or None (any other CLIP)."""
    for name, cfg in VARIANTS.items():
        size_fits = image_size is None or VARIANT_CLIP_SIZE[name] == image_size
        if (cfg.clip_dim, cfg.text_dim) == (vision_dim, text_dim) and size_fits:
            return name
    return None


def head_config_for(
    variant: str, vision_dim: int, text_dim: int, image_size: int | None = None, clip_name: str = "the shards' CLIP"
) -> tuple[HeadConfig, str | None]:
    """(head sizes, variant name) for features of a CLIP of these sizes.

    ``variant`` 'auto' takes the published variant made for that CLIP, or a head of the default
    sizes at its widths (variant None) for any other model, with as many attention heads (at most
    the default 8) as divide its width. A named variant that does not fit is a
    :class:`HeadMismatchError` naming the one that does.
    """
    if variant == AUTO:
        name = variant_for_clip(vision_dim, text_dim, image_size)
        if name:
            return VARIANTS[name], name
        heads = next(h for h in range(HeadConfig.num_heads, 0, -1) if vision_dim % h == 0)
        return replace(HeadConfig(), clip_dim=vision_dim, text_dim=text_dim, num_heads=heads), None
    if variant not in VARIANTS:
        raise HeadMismatchError(f"unknown head variant {variant!r}; expected {AUTO!r} or one of {sorted(VARIANTS)}")
    check_head_fits(VARIANTS[variant], vision_dim, text_dim, clip_name, f"the {variant} head")
    return VARIANTS[variant], variant


def check_head_fits(config: HeadConfig, vision_dim: int, text_dim: int, clip_name: str, head_name: str) -> None:
    """The one check of a head against a CLIP: its feature width and its text dim must be the
    CLIP's, or the head would read features it was never trained on."""
    if (config.clip_dim, config.text_dim) == (vision_dim, text_dim):
        return
    right = variant_for_clip(vision_dim, text_dim)
    fix = f"use the {right} head" if right else "use a head trained on this CLIP"
    raise HeadMismatchError(
        f"{head_name} expects CLIP features of width {config.clip_dim} and text dim {config.text_dim}, but "
        f"{clip_name} gives width {vision_dim} and text dim {text_dim}: {fix}, or extract the features with "
        f"the CLIP the head was made for ({_clip_of(config)})"
    )


def check_head_backbones(
    recorded: dict | None, sam_type: str, clip_id: str | None, clip_name: str, head_name: str
) -> None:
    """The one check of a head against the frozen pair it is given: a head trained on the tokens
    of one SAM and the map of one vision-language model reads nothing meaningful from another
    pair, even one of the same widths. ``recorded``: the head's ``backbones`` (None: not recorded,
    nothing to check); ``clip_id``: the given model's identity (None: unknown). What a head does
    not record (a published head names its CLIP, not its identity) is not compared."""
    if not recorded:
        return
    want_sam, want_clip = recorded.get("sam"), recorded.get("clip_id")
    sam_differs = want_sam is not None and want_sam != sam_type
    clip_differs = want_clip is not None and clip_id is not None and want_clip != clip_id
    if not (sam_differs or clip_differs):
        return
    trained = (
        f"SAM {want_sam or '(not recorded)'} + {recorded.get('clip') or 'CLIP'} (id {want_clip or 'not recorded'})"
    )
    raise HeadMismatchError(
        f"{head_name} was trained on the pair {trained}, but is given SAM {sam_type} + {clip_name} (id {clip_id}): "
        "use a head trained on this pair, or the SAM and vision-language model the head was trained on"
    )


def _clip_of(config: HeadConfig) -> str:
    right = variant_for_clip(config.clip_dim, config.text_dim)
    return VARIANT_CLIP[right] if right else f"vision width {config.clip_dim}, text dim {config.text_dim}"


class RegionSpotHead(nn.Module, HeadFolderMixin):
    """SAM region tokens -> cross-attention over CLIP tokens -> region embeddings in text space.

    ``save_pretrained(DIR)`` / ``RegionSpotHead.from_pretrained(DIR or "owner/name")`` write and
    read it as a model folder (:mod:`.pretrained`); ``variant`` is its published variant's name
    ('BB', 'BL', 'BL@336') or 'custom'.
    """

    config_class = HeadConfig

    def __init__(
        self,
        sam_dim: int = 256,
        clip_dim: int = 1024,
        text_dim: int = 768,
        depth: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        use_class_token: bool = True,
        logit_scale: float = HeadConfig.logit_scale,
    ) -> None:
        super().__init__()
        self.config = HeadConfig(
            sam_dim, clip_dim, text_dim, depth, num_heads, ffn_dim, dropout, use_class_token, logit_scale
        )
        self.to_clip = nn.Linear(sam_dim, clip_dim)
        layer = nn.TransformerDecoderLayer(
            d_model=clip_dim,
            nhead=num_heads,
            dim_feedforward=ffn_dim,
            dropout=dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,  # DETR-style post-norm, as the paper
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=depth, norm=nn.LayerNorm(clip_dim))
        self.projector = nn.Linear(clip_dim, text_dim)
        self.variant = infer_variant(self.config) or "custom"
        # the frozen pair it was trained on ({"sam": type, "clip": name, "clip_id": ...}), as its
        # file or folder records it; None when not recorded
        self.backbones: dict | None = None

    @classmethod
    def from_variant(cls, name: str, **overrides) -> RegionSpotHead:
        """Build a published variant: 'BB', 'BL' or 'BL@336' (sizes may be overridden)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name].to_dict(), **overrides})

    def forward(self, sam_tokens: Tensor, clip_tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Embed regions in CLIP's text space.

        Args:
            sam_tokens: [B, N, sam_dim] position-aware SAM tokens, N regions per image.
            clip_tokens: [B, T, clip_dim] CLIP feature map, class token first.
            padding_mask: [B, N] bool, True where a query is padding. Padded queries are
                ignored by the self-attention, so they never change the real queries' outputs.

        Returns:
            [B, N, text_dim] region embeddings (not normalized).
        """
        cfg = self.config
        if sam_tokens.dim() != 3 or sam_tokens.shape[-1] != cfg.sam_dim:
            raise ValueError(f"sam_tokens must be [B, N, {cfg.sam_dim}], got {tuple(sam_tokens.shape)}")
        if clip_tokens.dim() != 3 or clip_tokens.shape[-1] != cfg.clip_dim:
            raise ValueError(
                f"clip_tokens must be [B, T, {cfg.clip_dim}], got {tuple(clip_tokens.shape)}; "
                "is the head variant the one the features were extracted for?"
            )
        if clip_tokens.shape[0] != sam_tokens.shape[0]:
            raise ValueError("sam_tokens and clip_tokens must have the same batch size")
        if padding_mask is not None and padding_mask.shape != sam_tokens.shape[:2]:
            raise ValueError(
                f"padding_mask must be [B, N] = {tuple(sam_tokens.shape[:2])}, got {tuple(padding_mask.shape)}"
            )
        if not cfg.use_class_token:
            clip_tokens = clip_tokens[:, 1:]
        queries = self.to_clip(sam_tokens)
        memory = clip_tokens.to(queries.dtype)
        hidden = self.decoder(queries, memory, tgt_key_padding_mask=padding_mask)
        return self.projector(hidden)


def region_logits(region_embeddings: Tensor, text_embeddings: Tensor, scale: float = HeadConfig.logit_scale) -> Tensor:
    """Scaled cosine similarity between regions [..., D] and class texts [C, D] -> [..., C]."""
    regions = F.normalize(region_embeddings.float(), dim=-1, eps=1e-7)
    texts = F.normalize(text_embeddings.float(), dim=-1, eps=1e-7)
    return scale * regions @ texts.t()
