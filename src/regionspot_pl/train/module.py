"""The LightningModule: RegionSpot's head, its loss, the paper's optimizer and schedule, and
validation with box AP while training (the reference can only evaluate after training)."""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Sequence
from functools import partial

import lightning as L
import torch
from torch import Tensor

from ..data.annotations import GroundTruth
from ..evaluation.inputs import load_ground_truth
from ..evaluation.metrics import DEFAULT_BACKEND, evaluate_detections
from ..evaluation.scoring import MAX_DETS_PER_IMAGE, batch_detections, batch_logits
from ..model.head import HeadConfig, RegionSpotHead
from ..model.loss import region_focal_loss
from .datamodule import RegionBatch
from .settings import OptimConfig


def lr_factor(step: int, warmup_iters: int, warmup_factor: float, milestones: Sequence[int], gamma: float) -> float:
    """The paper's learning-rate multiplier at an iteration.

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters`` (as detectron2's
    WarmupMultiStepLR), times ``gamma`` for every milestone reached.
    """
    factor = gamma ** bisect_right(sorted(milestones), step)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class RegionSpotModule(L.LightningModule):
    """Trains the head on cached features against each dataset's text embeddings.

    Args:
        head: HeadConfig fields.
        optim: :meth:`OptimConfig.for_run` of the run (default: the paper's 450K-step run).
        text_embeddings: one [C_d, text_dim] tensor per training dataset (batch.dataset_index).
        val_text_embeddings: [C_val, text_dim] for the validation vocabulary.
        val_category_ids: dataset category id of each validation class (results format).
        val_annotations: GT file the validation AP is computed against.
        metric_backend: "hotcoco" (fast, default) or "lvis" (the official LVIS API, the reference).
    """

    def __init__(
        self,
        head: dict,
        optim: dict | None = None,
        text_embeddings: Sequence[Tensor] = (),
        val_text_embeddings: Tensor | None = None,
        val_category_ids: Sequence[int] = (),
        val_annotations: str | None = None,
        topk: int = MAX_DETS_PER_IMAGE,
        metric_backend: str = DEFAULT_BACKEND,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["text_embeddings", "val_text_embeddings"])
        self.head = RegionSpotHead(**HeadConfig(**head).to_dict())
        # Text embeddings are frozen data, recomputed from the text cache on every start: not
        # saved in checkpoints (V3Det's 13K classes would add 40 MB to each).
        for i, t in enumerate(text_embeddings):
            self.register_buffer(f"text_{i}", t.float(), persistent=False)
        if val_text_embeddings is not None:
            self.register_buffer("val_text", val_text_embeddings.float(), persistent=False)
        self._val_results: list[dict] = []
        self._val_gt: GroundTruth | None = None
        self._step_clock: float | None = None

    def text_for(self, dataset_index: int) -> Tensor:
        return getattr(self, f"text_{dataset_index}")

    def forward(self, batch: RegionBatch, texts: Tensor) -> Tensor:
        """[B, N, C] logits of each region against a vocabulary."""
        return batch_logits(self.head, batch, texts)

    def training_step(self, batch: RegionBatch, batch_idx: int) -> Tensor:
        logits = self(batch, self.text_for(batch.dataset_index))
        loss = region_focal_loss(logits, batch.labels, batch.valid)
        size = len(batch.meta)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        self.log("train/boxes_per_image", batch.valid.sum().float() / size, batch_size=size)
        now = time.perf_counter()
        if self._step_clock is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log(
                "train/images_per_s", size * world / max(now - self._step_clock, 1e-9), prog_bar=True, batch_size=size
            )
        self._step_clock = now
        return loss

    # ---- validation: detections in LVIS results format, AP at the end of the pass ----
    def on_validation_epoch_start(self) -> None:
        self._val_results = []

    def validation_step(self, batch: RegionBatch, batch_idx: int) -> None:
        """The test's steps (evaluation.scoring): logits, each image's detections, results."""
        logits = self(batch, self.val_text)
        for detections in batch_detections(logits, batch, self.hparams.topk):
            self._val_results += detections.results(self.hparams.val_category_ids)

    def on_validation_epoch_end(self) -> None:
        if not self.hparams.val_annotations:
            return
        results = self._val_results
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
        metrics = None
        if self.trainer.is_global_zero:
            if self._val_gt is None:  # read and checked once, not at every validation
                self._val_gt = load_ground_truth(self.hparams.val_annotations)
            metrics = (
                evaluate_detections(self._val_gt, results, iou_type="bbox", backend=self.hparams.metric_backend)
                if results
                else {}
            )
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        if self.trainer.sanity_checking:  # fit's step-0 check: the evaluation ran; the AP of 2 batches means nothing
            return
        for k, v in metrics.items():
            if v == v:  # NaN (e.g. no rare class in a small val set) is not logged
                self.log(f"val/{k}", float(v), prog_bar=k == "AP", sync_dist=False)

    def configure_optimizers(self):
        hp = self.hparams.optim or OptimConfig().for_run(OptimConfig().schedule_steps)
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        factor = partial(
            lr_factor,
            warmup_iters=hp["warmup_iters"],
            warmup_factor=hp["warmup_factor"],
            milestones=hp["milestones"],
            gamma=hp["gamma"],
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
