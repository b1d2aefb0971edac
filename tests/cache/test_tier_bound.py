"""The scheduler's bound holds for streams with a low-bit tier: a request run step by step
through CompressionSchedule (allocating what pages_for_step says, releasing down to
pages_to_keep, as vLLM's manager and the worker do) never needs a page it was not given,
whatever the split between tiers, the heads' budgets or the tier's cap."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.cache import PagedStreamCache, PagePool
from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies.selection import LowBitTier, Selection

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 3, 8, 4
CELL_BYTES = 2 * BLOCK_SIZE * HEAD_DIM * 4     # float32


@settings(max_examples=80, deadline=None)
@given(budget=st.integers(2, 30), interval=st.integers(1, 6), prompt=st.integers(1, 90),
       decode=st.integers(0, 40), chunk=st.integers(1, 50), cap=st.none() | st.integers(0, 40),
       bits=st.sampled_from([(1, 1), (3, 3), (8, 8)]), skew=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_pages_held_cover_both_tiers(budget, interval, prompt, decode, chunk, cap, bits, skew,
                                     seed):
    tier = LowBitTier(*bits, cap=cap)
    per_block = LowBitFormat(HEAD_DIM, *bits).slots_per_block(CELL_BYTES)
    schedule = CompressionSchedule(budget=budget, interval=interval, block_size=BLOCK_SIZE,
                                   low_slots_per_block=per_block, low_cap=cap)
    total = prompt + decode
    pages = 2 * (-(-total // BLOCK_SIZE)) + 4
    cache = PagedStreamCache(LAYERS, HEADS, HEAD_DIM, pages, 1, pages, block_size=BLOCK_SIZE,
                             dtype=torch.float32)
    pool = PagePool(pages)
    gen = torch.Generator().manual_seed(seed)
    computed, last, compressed = 0, 0, False
    while computed < total:
        step = min(chunk, prompt - computed) if computed < prompt else 1
        need = schedule.pages_for_step(computed, step, prompt, compressed)
        held = cache._page_counts[0]
        if need > held:
            cache.add_pages(0, pool.allocate(need - held))
        slot_ids = cache.append([0], [step])
        for layer in range(LAYERS):
            cache.write(layer, slot_ids[layer], torch.randn(step, HEADS, HEAD_DIM, generator=gen),
                        torch.randn(step, HEADS, HEAD_DIM, generator=gen),
                        torch.arange(computed, computed + step))
        computed += step
        if schedule.should_compress(computed, last, prompt):
            for layer in range(LAYERS):
                view = cache.gather(layer, [0])
                cache.compact(layer, [0], _mikv_like(view, budget, skew, tier, gen))
            last, compressed = computed, True
        assert int(cache.tables.used_blocks[:, 0].max()) <= cache._page_counts[0] * HEADS
        if compressed:   # the manager releases down to what the next step keeps
            pool.free(cache.release_pages(0, schedule.pages_to_keep(computed, prompt, True)))
        cache.check_invariants(pool.free_pages())
    pool.free(cache.reset([0]))
    assert pool.num_free == pages


def _mikv_like(view, budget, skew, tier, gen) -> Selection:
    """Keep a random set per stream within head budgets that sum to H * budget (skewed
    toward head 0, as Ada-KV may), demote every other live slot."""
    lengths = view.lengths
    weights = torch.tensor([1.0 + skew * (HEADS - 1)] + [1.0 - skew] * (HEADS - 1))
    shares = torch.floor(weights / weights.sum() * HEADS * budget).long()
    shares[0] += HEADS * budget - int(shares.sum())
    live = torch.arange(view.positions.shape[1])[None, :] < lengths[:, None]
    noise = torch.where(live, torch.rand(live.shape, generator=gen), -1.0)
    rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
    keep = live & (rank < shares[:, None])
    return Selection(keep=keep, demote=live & ~keep, demote_scores=noise.clamp(min=0),
                     low_tier=tier)
