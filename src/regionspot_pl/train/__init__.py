"""Stage 3, fit: the head trained on cached features (Lightning module and data module)."""
