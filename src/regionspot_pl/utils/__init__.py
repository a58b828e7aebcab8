"""Helpers every stage uses: atomic files and JSON, signals."""
