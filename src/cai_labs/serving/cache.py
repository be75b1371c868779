"""An LRU cache of finished generations, for deterministic requests only.

A request is deterministic when it decodes greedily (``temperature == 0``) or names its ``seed``:
the same request then always produces the same text, so a repeat can be answered from memory
without touching the model. Sampled requests without a seed must not be cached (a client asking
twice expects two different samples).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["LRUCache"]


class LRUCache:
    """A bounded mapping that forgets the least recently used entry first.

    ``capacity == 0`` turns it off: ``get`` always misses and ``put`` stores nothing. Thread
    safe (the server touches it from the event loop only, tests from anywhere).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The stored value (and mark it most recently used), or ``None``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        if self.capacity == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._data)
