"""The fit settings the tests train with: a small head on the tiny backbones' shards, on the CPU.

A plain module (not a fixture) so that tests/ddp_fit.py, which runs as a script, uses it too.
"""

from __future__ import annotations

from pathlib import Path

# a head sized to the tiny CLIP (auto), small enough to train in seconds
TINY_MODEL = {"variant": "auto", "ffn_dim": 64, "num_heads": 4}


def tiny_fit_config(
    train: str | Path, out: str | Path, steps: int, *, data: dict | None = None, optim: dict | None = None,
    trainer: dict | None = None,
) -> dict:  # fmt: skip
    """fit's settings as a YAML file holds them; ``data``, ``optim`` and ``trainer`` override the
    group's keys."""
    return {
        "model": dict(TINY_MODEL),
        "out": str(out),
        "seed": 0,
        "data": {"train_shards": [str(train)], "batch_size": 4, "workers": 0, "shuffle_buffer": 8, **(data or {})},
        "optim": {"lr": 1e-3, "warmup_iters": 2, **(optim or {})},
        "trainer": {
            "max_steps": steps,
            "val_every": steps,
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            **(trainer or {}),
        },
    }
