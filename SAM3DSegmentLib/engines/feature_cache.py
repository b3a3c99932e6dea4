"""A least-recently-used cache of image features held to a memory budget in bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


def nbytes(value: Any) -> int:
    """Bytes held by tensors / arrays inside ``value`` (nested tuples, lists, dicts)."""
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class FeatureCache:
    """LRU mapping key -> features; evicts the oldest entries to stay within ``budget_bytes``."""

    def __init__(self, budget_bytes: int = 2 * 1024**3):
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        if key in self._items:
            self.used_bytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.used_bytes += size
        while self.used_bytes > self.budget_bytes and len(self._items) > 1:
            _, (_, evicted) = self._items.popitem(last=False)
            self.used_bytes -= evicted
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.used_bytes = 0
