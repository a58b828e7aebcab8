"""The backbones the real-size benchmarks run: random weights at the real sizes, written once in
the official files' formats and loaded by the package's own code, as a user's would be; or, for
the small mode, the tiny random backbones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from transformers import CLIPConfig, CLIPModel

from regionspot_pl.backbones.sam import OFFICIAL_SAM_CHECKPOINTS
from regionspot_pl.backbones.sam2_model import OFFICIAL_SAM2_CHECKPOINTS, build_sam2_model
from regionspot_pl.backbones.tiny import tiny_backbone_paths, tiny_clip_tokenizer, write_tiny_backbones
from regionspot_pl.extract.features import FeatureExtractor
from regionspot_pl.utils.io import AtomicFile

from .common import CLIP_L14_VISION, counted_gflop
from .flops_stage import backbone_gflops

SAM2_TYPE = "sam2.1_hiera_b+"  # the SAM 2.1 of the real-size runs


def clip_vit_l14_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> CLIPConfig:
    """openai/clip-vit-large-patch14's sizes (text 12 x 768, vision 24 x 1024 at 224, patch 14)."""
    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 77, "eos_token_id": eos_token_id,
            "bos_token_id": bos_token_id, "pad_token_id": eos_token_id,
        },
        vision_config=CLIP_L14_VISION,
        projection_dim=768,
    )  # fmt: skip


def write_real_backbones(folder: Path, clip: bool = True, sam2: bool = False) -> dict[str, Path]:
    """Random SAM ViT-B, CLIP ViT-L/14 (``clip``; 1.7 GB) and SAM 2.1 hiera-b+ (``sam2``: a
    ``{"model": state_dict}`` file, as released) in the official files' formats, written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "sam_checkpoint": folder / OFFICIAL_SAM_CHECKPOINTS["vit_b"],
        "clip_dir": folder / "clip-vit-large-patch14",
    }
    if not paths["sam_checkpoint"].is_file():
        torch.manual_seed(0)
        state = sam_model_registry["vit_b"](checkpoint=None).state_dict()
        with AtomicFile(paths["sam_checkpoint"]) as tmp:
            torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    if clip and not (paths["clip_dir"] / "config.json").is_file():
        tokenizer = tiny_clip_tokenizer()  # a real CLIPTokenizer; the vocabulary does not change speed
        torch.manual_seed(1)
        config = clip_vit_l14_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
        CLIPModel(config).save_pretrained(paths["clip_dir"])
        tokenizer.save_pretrained(paths["clip_dir"])
    if sam2:
        paths["sam2_checkpoint"] = folder / OFFICIAL_SAM2_CHECKPOINTS[SAM2_TYPE]
        if not paths["sam2_checkpoint"].is_file():
            torch.manual_seed(2)
            state = build_sam2_model(SAM2_TYPE, None).state_dict()
            with AtomicFile(paths["sam2_checkpoint"]) as tmp:
                torch.save({"model": {k: v.detach().clone().contiguous() for k, v in state.items()}}, tmp)
    return paths


def tiny_backbones(folder: Path) -> dict[str, Path]:
    """The tiny random backbones under ``folder``, written unless every file is there already."""
    paths = tiny_backbone_paths(folder)
    return paths if all(p.exists() for p in paths.values()) else write_tiny_backbones(folder)


@dataclasses.dataclass(frozen=True)
class Backbones:
    """The models extraction runs: their files, how extract names them, their images' size."""

    label: str
    sam_type: str
    sam_checkpoint: Path
    clip_dir: Path
    image_size: int  # of the demo images they extract

    @property
    def tiny(self) -> bool:
        return self.image_size < 640

    def tflop_per_image(self, extractor: FeatureExtractor, items: list[dict], boxes_per_image: float) -> float:
        """TFLOP of one image's extraction. SAM ViT-B at real size: its encoder, CLIP and the decoder
        for each box, counted on the meta device (no compute); otherwise counted on one batch run."""
        if self.sam_type != "vit_b":
            return counted_gflop(lambda: extractor(items, "bench")) / len(items) / 1e3
        sam_gflop, box_gflop, clip_gflop = backbone_gflops()
        return (sam_gflop + clip_gflop + boxes_per_image * box_gflop) / 1e3


def backbones_for(out: Path, tiny: bool, sam: str = "sam") -> Backbones:
    """SAM (``sam="sam"``) or SAM 2.1 (``"sam2"``) with CLIP: ViT-B / hiera-b+ and ViT-L/14 at real
    size on 640 px images, or (``tiny``) the tiny random pair on 256 px images."""
    if tiny:
        paths = tiny_backbones(out / "tiny")
        if sam == "sam2":
            return Backbones("tiny SAM 2.1 + tiny CLIP", str(paths["sam2_config"]), paths["sam2_checkpoint"],
                             paths["clip_dir"], image_size=256)  # fmt: skip
        return Backbones("tiny SAM + tiny CLIP", "tiny", paths["sam_checkpoint"], paths["clip_dir"], image_size=256)
    paths = write_real_backbones(out / "real", sam2=sam == "sam2")
    if sam == "sam2":
        return Backbones("SAM 2.1 hiera-b+@1024 + CLIP ViT-L/14", SAM2_TYPE, paths["sam2_checkpoint"],
                         paths["clip_dir"], image_size=640)  # fmt: skip
    return Backbones("SAM ViT-B@1024 + CLIP ViT-L/14", "vit_b", paths["sam_checkpoint"], paths["clip_dir"], 640)
