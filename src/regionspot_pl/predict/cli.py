"""Name any region of one image with a trained RegionSpot head, and draw the result.

    python -m regionspot_pl.predict --image IMG --vocab "cat,dog"
        [--boxes "x1,y1,x2,y2;..."] [--points "x,y[,label] ...;..."] [--multimask true]
        --head HEAD --sam_type vit_b --sam_checkpoint sam_vit_b_01ec64.pth
        --clip_model DIR --out OUT.png [--topk 3] [--device cpu]
    python -m regionspot_pl.predict --everything true (--image IMG --out OUT.png | --images DIR [--out PICS])
        --json OUT.json --vocab ... --head ... [--generator.points_per_side 32 --generator.pred_iou_thresh 0.88 ...]

Regions are SAM prompts, given in pixels of the original image:

* ``--boxes "x1,y1,x2,y2;x1,y1,x2,y2"``: one region per ``;``-separated box.
* ``--points "x,y[,label] x,y[,label];..."``: one region per ``;``-separated group; the points of
  a group (separated by spaces) prompt SAM together. ``label`` is 1 (foreground, the default)
  or 0 (background), as SAM's ``point_labels``. ``--points "120,80;300,200"`` is two regions of
  one point each; ``--points "120,80 150,95,0"`` one region with a foreground and a background
  point.
* both: region i is box i together with points group i (SAM takes a box and points in one
  prompt); the two must have as many ``;``-separated entries.

``--multimask true`` names SAM's three candidate masks of each region (printed with SAM's predicted
IoU each; the picture shows the best). ``--vocab`` is a file (one class name a line) if that path
exists, else comma-separated names. ``--head`` is a head file (``.pt``) or a model folder
(config.json + model.safetensors, or a Hugging Face Hub id). Writes a picture (regions, top label
+ probability, SAM mask) and prints JSON, one entry per region.

``--everything true`` names every region SAM's own automatic mask generator finds (no prompts; its
parameters are the --generator.* flags below) against the vocabulary, drops those whose top probability is
below ``--score_thresh``, and writes one JSON for all images (COCO layout: ``images``,
``categories`` numbered 1.. in vocabulary order, and ``annotations`` with bbox, the generator's
mask as RLE, category_id/name and score, which is also a COCO results list) plus pictures.

Settings can also come from ``--config FILE.yaml`` (keys: the flags' names, the generator's under
``generator:``); ``--print_config`` prints them. The library is
:mod:`regionspot_pl.predict.predictor` (the :class:`~regionspot_pl.predict.predictor.Predictor`) and
:mod:`regionspot_pl.predict.everything`.
"""

import sys

from ..config import Command, run_command
from .settings import PredictConfig

COMMAND = Command(PredictConfig, "python -m regionspot_pl.predict", __doc__)


def run(config: PredictConfig) -> int:
    """Name the regions the settings ask for (:func:`regionspot_pl.predict.run.run`); 0 on success."""
    from .run import run as run_predict

    return run_predict(config)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMAND, argv, run, stop_hint="outputs written so far may be incomplete")


if __name__ == "__main__":
    sys.exit(main())
