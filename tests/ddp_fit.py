"""Run by test_fit.py in a subprocess: a 2-process DDP (gloo, CPU) fit that records the sample
keys each rank trains on. Lightning's DDP launcher re-runs this script once per extra rank."""

import json
import sys
from pathlib import Path

import lightning as L

from regionspot_pl.fit import run


class RecordKeys(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.keys += [m["key"] for m in batch.meta]

    def on_train_end(self, trainer, module):
        (self.out / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


if __name__ == "__main__":
    train, val, val_json, out, steps = sys.argv[1:6]
    cfg = {
        "model": {"variant": "auto", "ffn_dim": 64, "num_heads": 4},
        "out": out,
        "seed": 0,
        "data": {
            "train_shards": [train],
            "val_shards": val,
            "val_annotations": val_json,
            "batch_size": 2,
            "workers": 1,
            "shuffle_buffer": 4,
        },
        "optim": {"lr": 1e-3, "warmup_iters": 2},
        "trainer": {
            "max_steps": int(steps),
            "val_every": int(steps),
            "accelerator": "cpu",
            "devices": 2,
            "precision": "32-true",
            "enable_progress_bar": False,
        },
    }
    run(cfg, callbacks=[RecordKeys(Path(out))])
