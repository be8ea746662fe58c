"""A bounded LRU of vision embeddings keyed by media content, so re-sent images skip the tower."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class VisionCache:
    """Embeddings (tiles, 256, hidden) by content key; capacity counted in tiles."""

    def __init__(self, max_tiles: int) -> None:
        self.max_tiles = max_tiles
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._tiles = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, feats: torch.Tensor) -> None:
        n = feats.shape[0]
        if n > self.max_tiles:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = feats
            self._tiles += n
            while self._tiles > self.max_tiles:
                _, old = self._items.popitem(last=False)
                self._tiles -= old.shape[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._tiles = 0

    def __len__(self) -> int:
        return len(self._items)
