"""vLLM's prefix cache with a replacement policy and a lookup trace (engine core process).

vLLM keeps free pages in one queue (`FreeKVCacheBlockQueue`): pages without a hash at the
head, cached pages after them in release order, new pages taken from the head; so the
least recently released cached page is evicted first. `PredictedFreeBlockQueue` keeps
that queue and its accounting exactly and only changes which cached page leaves when one
must: the one the replacement policy names (sharing/replacement/). Pages in use are never
in the queue, so a wrong bit costs hits, never correctness.

`PrefixCacheScheduler` feeds the policy: each admitted request's lookup (its page-hash
chain and how many pages hit), one bit per page when the request's pages are released
(the request's `kv_cache_hint`, else the online predictor's), and writes the lookups to
`--kv-trace` in the format `vllm-kvcompress cache-sim` replays. A hint is "discard" or
"keep" for every page of the request, or a list of 0/1, one per prompt page (1 = discard;
what a driver that knows the whole batch computes, `sharing.predictors.exact_hints`).
Batch admission and group holding (`--kv-scheduling batch`) are BatchScheduler's, below.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter
from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

from vllm_kvcompress.sharing.predictors import HINT_KEY, HINTS, OnlinePredictor, valid_hint
from vllm_kvcompress.sharing.replacement import ReplacementPolicy, chain_bits, make_replacement
from vllm_kvcompress.vllm_plugin.batch_scheduler import BatchScheduler
from vllm_kvcompress.vllm_plugin.metrics import _metric
from vllm_kvcompress.vllm_plugin.request_settings import server_settings

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level



class PredictedFreeBlockQueue(FreeKVCacheBlockQueue):
    """vLLM's free block queue; cached blocks leave in `policy`'s order (keys: block ids)."""

    def __init__(self, blocks, policy: ReplacementPolicy, evictions: Counter | None = None):
        super().__init__(blocks)
        self.policy = policy
        self.by_id = {block.block_id: block for block in blocks}
        self.bits: dict[int, int] = {}      # block id -> bit for its next release
        self.evictions = evictions

    def popleft(self):
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list:
        taken = []
        for _ in range(n):
            head = self.fake_free_list_head.next_free_block
            victim = None
            if head is not self.fake_free_list_tail and head.block_hash is not None:
                victim = self.policy.pop_victim()
            if victim is None:      # an uncached page (or the queue's own error when empty)
                taken.append(super().popleft())
                self.policy.drop(taken[-1].block_id)
                continue
            block = self.by_id[victim]
            super().remove(block)
            taken.append(block)
            if self.evictions is not None:
                self.evictions.labels(cause=self.policy.last_cause).inc()
        return taken

    def remove(self, block) -> None:
        super().remove(block)
        self.policy.pin(block.block_id)

    def append(self, block) -> None:
        super().append(block)
        self._released(block)

    def append_n(self, blocks) -> None:
        super().append_n(blocks)
        for block in blocks:
            self._released(block)

    def prepend_n(self, blocks) -> None:
        super().prepend_n(blocks)
        for block in blocks:            # no hash: nothing to keep, no bit to use
            self.bits.pop(block.block_id, None)
            self.policy.drop(block.block_id)

    def _released(self, block) -> None:
        bit = self.bits.pop(block.block_id, None)
        if block.block_hash is None:
            self.policy.drop(block.block_id)
        else:
            self.policy.release(block.block_id, None if bit is None else bool(bit))


class PrefixCacheScheduler(BatchScheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        settings = server_settings(vllm_config)
        pool = self.kv_cache_manager.block_pool
        self.replacement = settings.kv_cache_replacement if pool.enable_caching else "lru"
        self.predictor: OnlinePredictor | None = None
        self.free_queue: PredictedFreeBlockQueue | None = None
        if self.replacement != "lru":
            free = [block for block in pool.blocks if not block.is_null]
            if pool.get_num_free_blocks() != len(free):
                raise RuntimeError("the prefix-cache queue must be replaced before any allocation")
            capacity = len(free)
            self.free_queue = PredictedFreeBlockQueue(
                free, make_replacement(self.replacement, capacity), _eviction_counter())
            pool.free_block_queue = self.free_queue
            self.predictor = OnlinePredictor(capacity)
        self.trace = open(settings.kv_trace, "a", buffering=1) if settings.kv_trace else None
        self._lookups: dict[str, tuple[list[str], int]] = {}   # looked up, not yet admitted
        self._bits: dict[str, list[int]] = {}                    # admitted request -> bits

    def _get_local_prefix_cache_hit(self, request):
        blocks, num_hit, *rest = super()._get_local_prefix_cache_hit(request)
        if self.free_queue is None and self.trace is None:    # compression alone: nothing to do
            return blocks, num_hit, *rest
        full_pages = request.block_hashes[: request.num_tokens // self.block_size]
        pages = [block_hash.hex()[:16] for block_hash in full_pages]
        self._lookups[request.request_id] = (pages, num_hit // self.block_size)
        return blocks, num_hit, *rest

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        for request_id in [r for r in self._lookups if r in self.requests
                           and self.requests[r] in self.running]:
            self._admitted(self.requests[request_id], *self._lookups.pop(request_id))
        return output

    def _admitted(self, request, pages: list[str], hits: int) -> None:
        hinted = hint_bits(request, len(pages))
        if self.free_queue is not None:
            self.free_queue.policy.note_lookup(pages, hits)
            predicted = self.predictor.predict(pages, hits)
            self.predictor.observe(pages)
            self._bits[request.request_id] = chain_bits(
                hinted if hinted is not None else predicted)
        if self.trace is not None:
            line: dict[str, Any] = {"pages": pages}
            if hinted is not None and None not in hinted:
                line["discard"] = hinted
            self.trace.write(json.dumps(line) + "\n")

    def _free_request_blocks(self, request) -> None:
        self._lookups.pop(request.request_id, None)
        bits = self._bits.pop(request.request_id, None)
        if self.free_queue is None:
            return super()._free_request_blocks(request)
        blocks = self.request_blocks(request.request_id)
        # Pages past the prompt's full pages (the answer, the next turn's prefix) take the
        # last prompt page's bit.
        bits = bits or hint_bits(request, len(blocks)) or []
        given = {}
        for index, block in enumerate(blocks):
            bit = bits[min(index, len(bits) - 1)] if bits else None
            if not block.is_null and bit is not None:
                given[block.block_id] = bit
        with self._bits_for_release(given):
            super()._free_request_blocks(request)

    def release_held(self, blocks: list) -> None:
        if self.free_queue is None:
            return super().release_held(blocks)
        # No member of the group is left to read them: they go first.
        with self._bits_for_release({block.block_id: 1 for block in blocks}):
            super().release_held(blocks)

    @contextmanager
    def _bits_for_release(self, bits: dict[int, int]):
        """`bits` (block id -> bit) wait in the queue for the pages freed inside."""
        self.free_queue.bits.update(bits)
        try:
            yield
        finally:
            for block_id in bits:   # still shared with a running request: no release yet
                self.free_queue.bits.pop(block_id, None)


def hint_bits(request, num_pages: int) -> list[int | None] | None:
    """The request's `kv_cache_hint` as one bit per page (None: no hint). A list shorter
    than the chain leaves the rest without a bit; the API server refused invalid hints."""
    params = request.sampling_params
    hint = (params.extra_args or {}).get(HINT_KEY) if params is not None else None
    if isinstance(hint, str) and hint in HINTS:
        return [HINTS[hint]] * num_pages
    if isinstance(hint, list) and valid_hint(hint):
        return [int(bit) for bit in hint[:num_pages]] + [None] * (num_pages - len(hint))
    return None



def _eviction_counter() -> Counter:
    return _metric(Counter, "vllm:kv_prefix_evictions",
                   "Cached prefix pages evicted, by the replacement policy's reason",
                   labelnames=("cause",))
