"""Embedded demo data: a synthetic LVIS-style scene set drawn locally (no download).

``generate_demo_dataset`` writes images + COCO/LVIS json for ``make demo``; ``render_preview``
draws a few scenes with their boxes so a person can look at the data.
"""

from .categories import Category, demo_categories, frequency_of, frequency_thresholds
from .scenes import generate_demo_dataset, render_preview

__all__ = [
    "Category",
    "demo_categories",
    "frequency_of",
    "frequency_thresholds",
    "generate_demo_dataset",
    "render_preview",
]
