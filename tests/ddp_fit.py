"""Run by test_fit.py in a subprocess: a 2-process DDP (gloo, CPU) fit that records the sample
keys each rank trains on. Lightning's DDP launcher re-runs this script once per extra rank."""

import json
import sys
from pathlib import Path

import lightning as L
from tiny_fit import tiny_fit_config

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
    data = {"val_shards": val, "val_annotations": val_json, "batch_size": 2, "workers": 1, "shuffle_buffer": 4}
    trainer = {"devices": 2, "log_every_n_steps": 50}
    cfg = tiny_fit_config(train, out, int(steps), data=data, trainer=trainer)
    run(cfg, callbacks=[RecordKeys(Path(out))])
