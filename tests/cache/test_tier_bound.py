"""The scheduler's bound holds for streams with a second tier: a request run step by step
through CompressionSchedule (allocating what pages_for_step says, releasing down to
pages_to_keep, as vLLM's manager and the worker do) never needs a page it was not given,
whatever the split between tiers, the heads' budgets, a low-bit tier's cap or how many
tokens a narrow-key tier took."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.cache import PagedStreamCache, PagePool
from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.cache.second_tier import row_format
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier, Selection

LAYERS, HEADS, BLOCK_SIZE = 2, 3, 4


@settings(max_examples=80, deadline=None)
@given(budget=st.integers(2, 30), interval=st.integers(1, 6), prompt=st.integers(1, 90),
       decode=st.integers(0, 40), chunk=st.integers(1, 50), cap=st.none() | st.integers(0, 40),
       bits=st.sampled_from([(1, 1), (3, 3), (8, 8)]), skew=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_pages_held_cover_a_low_bit_tier(budget, interval, prompt, decode, chunk, cap, bits,
                                         skew, seed):
    tier = LowBitTier(*bits, cap=cap)
    overflows, pages_back, pages = run_request(tier, 8, budget, interval, prompt, decode, chunk,
                                               skew, seed, recent=0)
    assert overflows == []
    assert pages_back == pages


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(2, 30), interval=st.integers(1, 6), prompt=st.integers(1, 90),
       decode=st.integers(0, 40), chunk=st.integers(1, 50), recent=st.integers(1, 20),
       ratio=st.sampled_from([0.0, 0.25, 0.5, 0.9]), skew=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_pages_held_cover_a_narrow_key_tier(budget, interval, prompt, decode, chunk, recent,
                                            ratio, skew, seed):
    """Ratio 0 prunes nothing: its rows are larger than full slots (3 per head-block, not 4)."""
    overflows, pages_back, pages = run_request(NarrowKeyTier(ratio), 64, budget, interval,
                                               prompt, decode, chunk, skew, seed, recent)
    assert overflows == []
    assert pages_back == pages


def run_request(tier, head_dim, budget, interval, prompt, decode, chunk, skew, seed,
                recent) -> tuple[list[int], int, int]:
    """Run one request; returns the steps whose head-blocks in use exceeded the pages held
    (x heads), the pages free once it ended, and the pool's size. The cache's invariants
    are checked after every step."""
    fmt = row_format(tier, head_dim, torch.float32)
    low_bit = isinstance(tier, LowBitTier)
    schedule = CompressionSchedule(
        budget=budget, interval=interval, block_size=BLOCK_SIZE,
        second_tier="low_bit" if low_bit else "narrow_key",
        tier_slots_per_block=fmt.slots_per_block(2 * BLOCK_SIZE * head_dim * 4),
        low_cap=tier.cap if low_bit else None, narrow_recent=recent)
    total = prompt + decode
    pages = 2 * (-(-total // BLOCK_SIZE)) + 4
    cache = PagedStreamCache(LAYERS, HEADS, head_dim, pages, 1, pages, block_size=BLOCK_SIZE,
                             dtype=torch.float32)
    pool = PagePool(pages)
    gen = torch.Generator().manual_seed(seed)
    computed, last, compressed_at, overflows = 0, 0, 0, []
    while computed < total:
        step = min(chunk, prompt - computed) if computed < prompt else 1
        need = schedule.pages_for_step(computed, step, prompt, compressed_at)
        held = cache._page_counts[0]
        if need > held:
            cache.add_pages(0, pool.allocate(need - held))
        slot_ids = cache.append([0], [step])
        for layer in range(LAYERS):
            cache.write(layer, slot_ids[layer], torch.randn(step, HEADS, head_dim, generator=gen),
                        torch.randn(step, HEADS, head_dim, generator=gen),
                        torch.arange(computed, computed + step))
        computed += step
        if schedule.should_compress(computed, last, prompt):
            for layer in range(LAYERS):
                view = cache.gather(layer, [0])
                cache.compact(layer, [0], random_selection(view, budget, skew, tier, recent, gen))
            last, compressed_at = computed, compressed_at or computed
        if int(cache.tables.used_blocks[:, 0].max()) > cache._page_counts[0] * HEADS:
            overflows.append(computed)
        if compressed_at:   # the manager releases down to what the next step keeps
            pool.free(cache.release_pages(0, schedule.pages_to_keep(computed, prompt,
                                                                    compressed_at)))
        cache.check_invariants(pool.free_pages())
    pool.free(cache.reset([0]))
    return overflows, pool.num_free, pages


def random_selection(view, budget, skew, tier, recent, gen) -> Selection:
    """Keep a random set per stream within head budgets that sum to H * budget (skewed
    toward head 0, as Ada-KV may), the last `recent` slots first (a policy's window);
    demote every other live slot (low-bit), or narrow the kept ones but the last `recent`
    (narrow-key)."""
    lengths = view.lengths
    weights = torch.tensor([1.0 + skew * (HEADS - 1)] + [1.0 - skew] * (HEADS - 1))
    shares = torch.floor(weights / weights.sum() * HEADS * budget).long()
    shares[0] += HEADS * budget - int(shares.sum())
    slots = torch.arange(view.positions.shape[1])[None, :]
    live = slots < lengths[:, None]
    noise = torch.where(live, torch.rand(live.shape, generator=gen), -1.0)
    noise = torch.where(live & (slots >= (lengths - recent)[:, None]), 2.0, noise)
    rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
    keep = live & (rank < shares[:, None])
    if isinstance(tier, LowBitTier):
        return Selection(keep=keep, demote=live & ~keep, demote_scores=noise.clamp(0, 1),
                         second_tier=tier)
    head_dim = view.keys.shape[-1]
    pruned = head_dim - tier.kept_channels(head_dim)
    order = torch.rand(len(lengths), head_dim, generator=gen).argsort(dim=1)
    scales = torch.ones(len(lengths), head_dim).scatter(1, order[:, :pruned], 0.0)
    return Selection(keep=keep, narrow=keep & (slots < (lengths - recent)[:, None]),
                     key_scales=scales, second_tier=tier)
