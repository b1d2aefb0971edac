"""Least recently released first: vLLM's own prefix-cache order (its free block queue)."""

from __future__ import annotations

from collections import OrderedDict

from vllm_kvcompress.sharing.replacement.base import Page, ReplacementPolicy


class LRU(ReplacementPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._evictable: OrderedDict[Page, None] = OrderedDict()  # oldest release first

    def pin(self, page: Page) -> None:
        self._evictable.pop(page, None)

    def release(self, page: Page, discard: bool | None = None) -> None:
        self._evictable.pop(page, None)
        self._evictable[page] = None

    def drop(self, page: Page) -> None:
        self._evictable.pop(page, None)

    def pop_victim(self) -> Page | None:
        if not self._evictable:
            return None
        return self._evictable.popitem(last=False)[0]

    def num_evictable(self) -> int:
        return len(self._evictable)
