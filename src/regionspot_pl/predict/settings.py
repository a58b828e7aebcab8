"""The settings of ``python -m regionspot_pl.predict`` and of SAM's automatic mask generator.

A light module (no CLIP, no Lightning), so that the command line starts without them.
"""

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from ..backbones.build import check_sam_type
from ..backbones.common import DEFAULT_TEXT_CACHE, PRECISIONS, resolve_device
from ..errors import RegionSpotError
from ..utils.checks import Range, check_settings

Fraction = Annotated[float, Range(0, 1)]


class PredictConfigError(RegionSpotError, ValueError):
    """Predict settings that are missing or do not go together."""


@dataclass(frozen=True)
class GeneratorSettings:
    """``SamAutomaticMaskGenerator``'s parameters, with its defaults (see its docstring)."""

    points_per_side: Annotated[int, Range(1)] = 32
    """a grid of N x N point prompts over the image"""
    points_per_batch: Annotated[int, Range(1)] = 64
    """point prompts per decoder call (memory)"""
    pred_iou_thresh: Fraction = 0.88
    """keep masks whose SAM-predicted IoU is at least this (lower it on small SAMs)"""
    stability_score_thresh: Fraction = 0.95
    """keep masks whose stability score is at least this (lower it on small SAMs)"""
    stability_score_offset: float = 1.0
    """logit offset the stability score binarizes at"""
    box_nms_thresh: Fraction = 0.7
    """box IoU above which a duplicate mask is dropped (1: keep all)"""
    crop_n_layers: Annotated[int, Range(0)] = 0
    """also run on 2^i x 2^i image crops, i = 1..N"""
    crop_nms_thresh: Fraction = 0.7
    """box IoU above which a duplicate mask of another crop is dropped"""
    crop_overlap_ratio: Fraction = 512 / 1500
    """overlap of neighbouring crops, as a fraction of the image side"""
    crop_n_points_downscale_factor: Annotated[int, Range(1)] = 1
    """the grid side shrinks by this per crop layer"""
    min_mask_region_area: Annotated[int, Range(0)] = 0
    """remove islands and fill holes under this many pixels (opencv)"""

    def __post_init__(self) -> None:
        check_settings(self)

    def build(self, segmenter: Any) -> Any:
        """The segmenter's own automatic mask generator (segment-anything's for SAM, sam2's for
        SAM 2.1) with these settings, giving binary masks."""
        return segmenter.automatic_mask_generator(output_mode="binary_mask", **asdict(self))


@dataclass
class PredictConfig:
    """The settings of ``python -m regionspot_pl.predict``."""

    image: str | None = None
    """image file"""
    images: str | None = None
    """with everything: a folder of images (.jpg, .png, ...; not its subfolders)"""
    boxes: str | None = None
    """regions as boxes in pixels: "x1,y1,x2,y2;x1,y1,x2,y2" (";" between regions)"""
    points: str | None = None
    """regions as points in pixels: "x,y[,label] x,y[,label];x,y" (";" between regions, spaces between the points
    of one region; label 1 foreground (default), 0 background). With boxes: region i is box i plus points group i"""
    multimask: bool = False
    """name SAM's three masks per region"""
    vocab: str | None = None
    """class-name file (one a line) or 'cat,dog,...' (required)"""
    head: str | None = None
    """head file (.pt: fit's head.pt, convert's output) or model folder / Hugging Face Hub id (required)"""
    sam_type: str | None = None
    """segmenter: vit_b, vit_l, vit_h, tiny (SAM); sam2.1_hiera_t, sam2.1_hiera_s, sam2.1_hiera_b+, sam2.1_hiera_l
    (SAM 2.1); or the path of a SAM 2 model config .yaml (required)"""
    sam_checkpoint: str | None = None
    """SAM or SAM 2 checkpoint, e.g. sam_vit_b_01ec64.pth, sam2.1_hiera_base_plus.pt (required)"""
    clip_model: str | None = None
    """local Hugging Face CLIP folder (required)"""
    out: str | None = None
    """picture to write (PNG); with everything and images, a folder for one picture per image (optional there)"""
    attention_out: str | None = None
    """also write the regions' attention maps (PNG grid)"""
    topk: Annotated[int, Range(1)] = 3
    """labels per region"""
    device: str = "cpu"
    """cpu, cuda or cuda:N"""
    precision: Literal[PRECISIONS] = "auto"
    """autocast as in extraction (auto: fp32 on CPU)"""
    text_cache: str = DEFAULT_TEXT_CACHE
    """HDF5 text-embedding cache"""
    everything: bool = False
    """name every region SAM's automatic mask generator finds"""
    json: str | None = None
    """with everything: COCO-layout JSON to write (images, categories, annotations)"""
    score_thresh: Fraction = 0.0
    """with everything: drop regions whose top probability is below this (0: keep all; the top probability is at
    least 1 / vocabulary size)"""
    progress: bool = True
    """with everything and images: a progress bar on stderr"""
    generator: GeneratorSettings = field(default_factory=GeneratorSettings)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.sam_type is not None:
            check_sam_type(self.sam_type)

    def check(self) -> None:
        """Required settings and flags that do not go together, before anything is loaded."""
        for name in ("vocab", "head", "sam_type", "sam_checkpoint", "clip_model"):
            if getattr(self, name) is None:
                raise PredictConfigError(f"--{name} is required (see --help)")
        check_sam_type(self.sam_type)
        resolve_device(self.device)
        if self.everything:
            self._check_everything()
            return
        if self.images:
            raise PredictConfigError("--images DIR works with --everything true; name your own regions with --image")
        if not self.image:
            raise PredictConfigError("give --image IMG (and --boxes and/or --points), or --everything true")
        if not (self.boxes or self.points):
            raise PredictConfigError("give the regions: --boxes and/or --points (or --everything true)")
        if not self.out:
            raise PredictConfigError("give --out PICTURE.png")

    def _check_everything(self) -> None:
        given = [f"--{f}" for f in ("boxes", "points", "attention_out") if getattr(self, f)]
        if given or self.multimask:
            flag = given[0] if given else "--multimask true"
            raise PredictConfigError(f"{flag} does not go with --everything, which finds the regions itself")
        if bool(self.image) == bool(self.images):
            raise PredictConfigError("--everything takes one of --image IMG or --images DIR")
        if not self.json:
            raise PredictConfigError("--everything needs --json OUT.json for the named regions")
        if self.image and not self.out:
            raise PredictConfigError("--everything --image needs --out PICTURE.png")
