"""Shared fixtures. ``tiny_backbones``: random tiny SAM + CLIP written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from regionspot_pl.backbones.tiny import write_tiny_backbones


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"sam_checkpoint": .../sam_tiny.pth, "clip_dir": .../clip_tiny} for seed 0."""
    return write_tiny_backbones(tmp_path_factory.mktemp("tiny_backbones"), seed=0)
