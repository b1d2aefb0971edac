"""The marking algorithm driven by one-bit predictions (Paging with Succinct Predictions).

Marking: time splits into phases; a page used in the current phase is marked and is not
evicted while unmarked pages remain; when every evictable page is marked a new phase
starts and all marks clear. Any marking algorithm misses at most k times per phase.

The bit decides which unmarked page goes (our reconstruction of the paper's two setups,
from its abstract; docs/design.md says what is ours):
- `bits="discard"`: the bit of a use says "safe to evict" (in the offline optimum the page
  leaves the cache before its next use). Such a page is released unmarked and evicted
  before every other page; a page released without the bit is marked as usual.
- `bits="phase"`: the bit says "not needed in the next phase". Pages are marked as usual;
  when a phase starts, pages whose last bit said so are evicted first.
Without bits both are exactly LRU (the least recently released page is always unmarked
while any unmarked page exists).

Robustness guard: the policy replays LRU on the lookups it is told about (`note_lookup`)
and follows the bits only while its own misses stay within (1 + slack) x LRU's + k; past
that it evicts exactly as LRU would until it is back under. Misses are counted a request
at a time (at most L, the longest request, past the threshold before the guard acts), and
LRU started from any cache content holds the same pages as LRU itself after k distinct
uses: misses <= (1 + slack) LRU + 2k + L (`bound`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

from vllm_kvcompress.sharing.replacement.base import Page, ReplacementPolicy

BIT_KINDS = ("discard", "phase")


class ShadowLRU:
    """Misses LRU would have on the same chain lookups, one request at a time."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.misses = 0
        self._pages: OrderedDict[Page, None] = OrderedDict()

    def lookup(self, pages: Sequence[Page]) -> None:
        hits = 0
        while hits < len(pages) and pages[hits] in self._pages:
            hits += 1
        self.misses += len(pages) - hits
        for page in reversed(pages):    # tail first, as vLLM releases a request's pages
            self._pages.pop(page, None)
            self._pages[page] = None
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)


class Marking(ReplacementPolicy):
    def __init__(self, capacity: int, bits: str = "discard", slack: float = 0.05) -> None:
        if bits not in BIT_KINDS:
            raise ValueError(f"bits={bits!r}: allowed values are {', '.join(BIT_KINDS)}")
        if slack < 0:
            raise ValueError(f"slack={slack}: must be >= 0")
        self.name = f"marking-{bits}"
        self.bits, self.capacity, self.slack = bits, capacity, slack
        # Every evictable page is in exactly one of these, oldest release first.
        self._evict_first: OrderedDict[Page, None] = OrderedDict()
        self._unmarked: OrderedDict[Page, None] = OrderedDict()
        self._marked: OrderedDict[Page, None] = OrderedDict()
        self._stamp: dict[Page, int] = {}           # release order, for the LRU fallback
        self._phase_bit: dict[Page, bool] = {}      # bits="phase": last bit of each page
        self._clock = itertools.count()
        self.shadow = ShadowLRU(capacity)
        self.misses = 0
        self.phases = 1
        self.guarded_evictions = 0                  # evictions made as LRU by the guard
        self.last_cause = ""                        # predicted | unmarked | guard

    # -- the store's notifications -------------------------------------------------
    def pin(self, page: Page) -> None:
        self._forget(page)

    def release(self, page: Page, discard: bool | None = None) -> None:
        self._forget(page)
        self._stamp[page] = next(self._clock)
        if self.bits == "discard" and discard:
            self._evict_first[page] = None
            return
        if self.bits == "phase":
            self._phase_bit[page] = bool(discard)
        self._marked[page] = None

    def drop(self, page: Page) -> None:
        self._forget(page)
        self._stamp.pop(page, None)
        self._phase_bit.pop(page, None)

    def note_lookup(self, pages: Sequence[Page], num_hits: int) -> None:
        self.misses += len(pages) - num_hits
        self.shadow.lookup(pages)

    # -- the one question ---------------------------------------------------------
    def trusted(self) -> bool:
        return self.misses <= (1 + self.slack) * self.shadow.misses + self.capacity

    def bound(self, lru_misses: int, longest_request: int) -> float:
        """The most misses the guard allows against LRU's `lru_misses`."""
        return (1 + self.slack) * lru_misses + 2 * self.capacity + longest_request

    def pop_victim(self) -> Page | None:
        if not self.num_evictable():
            return None
        if not self.trusted():
            self.guarded_evictions += 1
            self.last_cause = "guard"
            return self._pop_least_recent()
        if not self._evict_first and not self._unmarked:
            self._start_phase()
        self.last_cause = "predicted" if self._evict_first else "unmarked"
        return self._pop(self._evict_first or self._unmarked)

    def num_evictable(self) -> int:
        return len(self._evict_first) + len(self._unmarked) + len(self._marked)

    # -- internals ----------------------------------------------------------------
    def _forget(self, page: Page) -> None:
        for queue in (self._evict_first, self._unmarked, self._marked):
            if page in queue:
                del queue[page]
                return

    def _start_phase(self) -> None:
        self.phases += 1
        marked, self._marked = self._marked, OrderedDict()
        for page in marked:
            evict_first = self.bits == "phase" and self._phase_bit.get(page, False)
            (self._evict_first if evict_first else self._unmarked)[page] = None

    def _pop_least_recent(self) -> Page:
        heads = [(self._stamp[next(iter(q))], q)
                 for q in (self._evict_first, self._unmarked, self._marked) if q]
        return self._pop(min(heads, key=lambda head: head[0])[1])

    def _pop(self, queue: OrderedDict[Page, None]) -> Page:
        page = queue.popitem(last=False)[0]
        self._stamp.pop(page, None)
        self._phase_bit.pop(page, None)
        return page
