"""What a cache of reusable pages asks its replacement policy.

A page is any hashable id (vLLM's block hash, a chunk key, a trace's page string). The
store owning the pages (the trace simulator, vLLM's free block queue, the chunk store)
tells the policy four things and asks one:
- `pin(page)`: the page is in use (a hit or freshly computed) and cannot be evicted;
- `release(page, discard)`: it is evictable again; `discard` is the one-bit prediction
  that came with this use ("safe to evict" for discard bits, "not needed in the next
  phase" for phase bits); None when there is no prediction;
- `drop(page)`: the store removed it without asking (a reset, a hash collision);
- `pop_victim()`: the evictable page to evict now, removed from the policy (None when
  nothing is evictable).
A policy only ever returns pages that were released and not pinned since, so a wrong bit
can cost hits but never hand out a page that is in use.

A prefix cache's pages form chains; `chain_bits` makes a chain's bits consistent before
they are given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence

Page = Hashable


class ReplacementPolicy(ABC):
    name: str
    last_cause: str = "lru"    # why the last victim was chosen (for metrics)

    @abstractmethod
    def pin(self, page: Page) -> None: ...

    @abstractmethod
    def release(self, page: Page, discard: bool | None = None) -> None: ...

    @abstractmethod
    def drop(self, page: Page) -> None: ...

    @abstractmethod
    def pop_victim(self) -> Page | None: ...

    @abstractmethod
    def num_evictable(self) -> int: ...

    def note_lookup(self, pages: Sequence[Page], num_hits: int) -> None:
        """A request looked up the chain `pages` and found its first `num_hits` cached."""


def chain_bits(bits: Sequence[int | None]) -> list[int | None]:
    """Bits of a prefix chain, first page first, made consistent: a page is discard only if
    no later page of the chain is kept, since a prefix is read whenever anything after it
    is (a lookup stops at the first miss). One wrong "keep" then costs a chain's pages
    their eviction order, one wrong "discard" no longer breaks a kept chain in the middle."""
    out: list[int | None] = []
    kept_after = False
    for bit in reversed(bits):
        kept_after = kept_after or bit == 0
        out.append(0 if kept_after and bit is not None else bit)
    return out[::-1]
