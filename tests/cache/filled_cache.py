"""A small cache filled with random tokens, and comparing stream views (compaction tests)."""

from __future__ import annotations

import torch

from vllm_kvcompress.cache import PagedStreamCache, PagePool

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 4, 8, 4


def filled_cache(token_counts: list[int], seed: int = 0, dtype: torch.dtype = torch.float32,
                 spare_pages: int = 0):
    """A cache whose requests 0.. hold token_counts[r] random tokens in every stream, in
    the pages that takes plus `spare_pages` each (room for a low-bit tier)."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedStreamCache(LAYERS, HEADS, HEAD_DIM, num_pages=40, max_requests=4,
                             max_pages_per_request=12, block_size=BLOCK_SIZE, dtype=dtype)
    pool = PagePool(40)
    slots = list(range(len(token_counts)))
    for slot, need in zip(slots, cache.pages_needed(slots, token_counts).tolist()):
        cache.add_pages(slot, pool.allocate(need + spare_pages))
    slot_ids = cache.append(slots, token_counts)
    positions = torch.cat([torch.arange(n) for n in token_counts])
    total = sum(token_counts)
    for layer in range(LAYERS):
        cache.write(layer, slot_ids[layer], torch.randn(total, HEADS, HEAD_DIM, generator=gen),
                    torch.randn(total, HEADS, HEAD_DIM, generator=gen), positions,
                    torch.rand(total, HEADS, generator=gen))
    return cache, pool


def assert_view_equals(got, want):
    assert torch.equal(got.lengths, want.lengths)
    width = got.positions.shape[1]
    assert torch.equal(got.positions, want.positions[:, :width])
    for name in ("keys", "values", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name)[:, :width],
                                   atol=1e-5, rtol=1e-5)
