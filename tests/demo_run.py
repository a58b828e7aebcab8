"""What a run of ``scripts/demo.py --quick`` leaves, checked the same way wherever a test runs it
(``make demo`` in tests/test_scripts.py, ``make serve`` in tests/serve/test_make_targets.py)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def check_quick_demo(printed: str, out: Path, sam: str = "sam", clip: str = "clip") -> None:
    """Every stage ran, the table names the pair and its chance row, AP is a fraction, and both
    pictures were drawn under ``out``."""
    for stage in ("tiny backbones", "extract train", "extract val", "fit", "test"):
        assert f"[demo] {stage}: " in printed
    assert f"RegionSpot demo ({sam} + {clip})" in printed
    assert "shuffled labels (chance)" in printed
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert 0 <= metrics["bbox"]["AP"] <= 1
    for picture in ("predictions.png", "attention.png"):
        with Image.open(out / picture) as im:
            assert im.width > 100
