"""Bounded memory for the server: a least-recently-used mapping."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class LRUCache(OrderedDict):
    """A dict of at most ``maxsize`` entries: reading or writing an entry makes it the newest,
    writing past the bound drops the oldest."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        super().__init__()
        self.maxsize = maxsize

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
