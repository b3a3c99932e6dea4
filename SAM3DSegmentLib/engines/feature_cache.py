"""A least-recently-used cache of image features held to a memory budget in bytes.

Several caches can share one budget through a :class:`CachePool` (the server's sessions do): the
least recently used entry of any of them is evicted first. Neither class is thread-safe; one
thread uses a pool and its caches.
"""

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
    """LRU mapping key -> features; evicts the oldest entries to stay within ``budget_bytes``.

    With a ``pool``, the pool's budget holds for all its caches together (``budget_bytes`` is
    then the pool's).
    """

    def __init__(self, budget_bytes: int = 2 * 1024**3, pool: "CachePool | None" = None):
        self.pool = pool
        self.budget_bytes = int(pool.budget_bytes if pool is not None else budget_bytes)
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
        if self.pool is not None:
            self.pool._touch(self, key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        self._drop(key)
        self._items[key] = (value, size)
        self.used_bytes += size
        if self.pool is not None:
            self.pool._add(self, key, size)
            return
        while self.used_bytes > self.budget_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)))
            self.evictions += 1

    def clear(self) -> None:
        for key in list(self._items):
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used_bytes -= item[1]
            if self.pool is not None:
                self.pool._remove(self, key, item[1])


class CachePool:
    """One byte budget shared by several :class:`FeatureCache` objects (see :meth:`cache`)."""

    def __init__(self, budget_bytes: int = 2 * 1024**3):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self._order: OrderedDict[tuple[int, Hashable], FeatureCache] = OrderedDict()

    def cache(self) -> FeatureCache:
        """A new cache drawing on this pool's budget."""
        return FeatureCache(pool=self)

    def _touch(self, cache: FeatureCache, key: Hashable) -> None:
        self._order.move_to_end((id(cache), key))

    def _add(self, cache: FeatureCache, key: Hashable, size: int) -> None:
        self._order[(id(cache), key)] = cache
        self.used_bytes += size
        while self.used_bytes > self.budget_bytes and len(self._order) > 1:
            (_, oldest_key), owner = next(iter(self._order.items()))
            owner._drop(oldest_key)
            owner.evictions += 1

    def _remove(self, cache: FeatureCache, key: Hashable, size: int) -> None:
        self._order.pop((id(cache), key), None)
        self.used_bytes -= size
