"""Replay a lookup trace through a prefix cache of N pages, one request at a time.

A request looks up its page chain and hits its longest cached prefix (vLLM stops at the
first miss); every page of the request is then in use (pinned) until the request ends,
missing pages are computed and cached, evicting as the policy says, and all of them are
released with the request's bits, tail first (vLLM's order: with equal recency a chain
loses its end before its start). Hit rate = hit pages / looked-up pages.
`belady` is the offline reference: evict the page used again farthest in the future.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_kvcompress.sharing.replacement import ReplacementPolicy, chain_bits
from vllm_kvcompress.sharing.traces import TraceRequest

Bits = Sequence[Sequence[int | None]]   # one bit (or None) per page of every request


@dataclass
class Replay:
    hits: int = 0
    lookups: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits


def check_fits(trace: Sequence[TraceRequest], capacity: int) -> None:
    longest = max((len(r.pages) for r in trace), default=0)
    if capacity < longest:
        raise ValueError(f"--cache-pages {capacity}: a request in the trace has {longest} "
                         f"pages; the cache must hold at least that many")


def _look_up(request: TraceRequest, cached: set[str], result: Replay) -> tuple[list[str], int]:
    """The request's pages (each once) and how many of them hit: the longest cached prefix,
    as vLLM stops at the first miss. Counted into `result`."""
    pages = list(dict.fromkeys(request.pages))
    hits = 0
    while hits < len(pages) and pages[hits] in cached:
        hits += 1
    result.hits += hits
    result.lookups += len(pages)
    return pages, hits


def replay(trace: Sequence[TraceRequest], capacity: int, policy: ReplacementPolicy,
           bits: Bits | None = None, predictor=None) -> Replay:
    """Run `policy` over `trace`. Bits come from `bits` (per request, per page) or, request
    by request, from `predictor.predict(pages, num_hits)` / `predictor.observe(pages)`."""
    check_fits(trace, capacity)
    cached: set[str] = set()
    result = Replay()
    for index, request in enumerate(trace):
        pages, hits = _look_up(request, cached, result)
        policy.note_lookup(pages, hits)
        request_bits = chain_bits(bits[index] if bits is not None
                                  else predictor.predict(pages, hits) if predictor is not None
                                  else [None] * len(pages))
        for page in pages:
            if page in cached:
                policy.pin(page)
        for page in pages:
            if page in cached:
                continue
            if len(cached) >= capacity:
                victim = policy.pop_victim()
                if victim not in cached or victim in pages:
                    raise AssertionError(f"{policy.name} evicted {victim!r}, not evictable")
                cached.remove(victim)
                result.evictions += 1
            cached.add(page)
            policy.pin(page)
        # Tail first, as vLLM frees a request's blocks: a chain's end goes before its start.
        for page, bit in reversed(list(zip(pages, request_bits))):
            policy.release(page, None if bit is None else bool(bit))
        if predictor is not None:
            predictor.observe(pages)
    return result


def next_uses(trace: Sequence[TraceRequest]) -> list[dict[str, float]]:
    """For every request, the index of the next request using each of its pages (inf: never)."""
    upcoming: dict[str, float] = {}
    out: list[dict[str, float]] = [{} for _ in trace]
    for index in range(len(trace) - 1, -1, -1):
        for page in trace[index].pages:
            out[index][page] = upcoming.get(page, math.inf)
        for page in trace[index].pages:
            upcoming[page] = index
    return out


def belady(trace: Sequence[TraceRequest], capacity: int) -> tuple[Replay, list[list[int]]]:
    """Farthest-in-future replacement, and for every use whether it was a discard: the page
    left the cache before its next use (or had none)."""
    check_fits(trace, capacity)
    future = next_uses(trace)
    cached: set[str] = set()
    released_at: dict[str, int] = {}     # page -> request that last released it
    heap: list[tuple[float, int, int, str]] = []
    discard = [[0] * len(r.pages) for r in trace]
    where: dict[str, tuple[int, int]] = {}   # page -> (request, position) of its last use
    result = Replay()
    for index, request in enumerate(trace):
        pages, hits = _look_up(request, cached, result)
        for page in pages:
            released_at.pop(page, None)      # pinned while this request runs
        for page in pages:
            if page in cached:
                continue
            if len(cached) >= capacity:
                while True:
                    _, _, at, victim = heapq.heappop(heap)
                    if released_at.get(victim) == at:
                        break
                cached.remove(victim)
                del released_at[victim]
                r, pos = where[victim]
                discard[r][pos] = 1
                result.evictions += 1
            cached.add(page)
        for pos, page in enumerate(pages):
            released_at[page] = index
            where[page] = (index, pos)
            # Ties (a chain's pages are next read together): the deepest page goes first,
            # since a lookup stops at the first miss.
            heapq.heappush(heap, (-future[index][page], -pos, index, page))
    for page, (r, pos) in where.items():
        if future[r][page] == math.inf:
            discard[r][pos] = 1
    return result, discard
