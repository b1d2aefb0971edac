"""Appending tokens: where head-blocks come from, and refusals that change nothing."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.cache import PagedStreamCache

HEADS, BLOCK_SIZE = 2, 4


def make_cache(**overrides) -> PagedStreamCache:
    config = dict(num_layers=2, num_kv_heads=HEADS, head_size=8, num_pages=16, max_requests=3,
                  max_pages_per_request=6, block_size=BLOCK_SIZE, dtype=torch.float32)
    return PagedStreamCache(**(config | overrides))


def test_slot_ids_follow_the_bump_pointer_over_the_requests_pages():
    cache = make_cache()
    cache.add_pages(1, [7, 3])
    slot_ids = cache.append([1], [5])                          # 5 tokens: 2 blocks per head
    assert slot_ids.shape == (2, 5, HEADS)
    # Block-major: head 0 -> locals 0, 2; head 1 -> 1, 3. Page 7 holds every head's first
    # block, page 3 every head's second: vLLM's layout of uncompressed tokens.
    head_blocks = {0: [7 * HEADS + 0, 3 * HEADS + 0], 1: [7 * HEADS + 1, 3 * HEADS + 1]}
    for head, blocks in head_blocks.items():
        want = [blocks[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE for t in range(5)]
        assert slot_ids[0, :, head].tolist() == want
        assert slot_ids[1, :, head].tolist() == want
    assert cache.tables.used_blocks[:, 1].tolist() == [4, 4]
    assert cache.tables.lengths[:, 1].tolist() == [[5, 5], [5, 5]]


def test_tokens_of_a_batch_are_request_major():
    cache = make_cache()
    cache.add_pages(0, [0, 1])
    cache.add_pages(2, [2])
    slot_ids = cache.append([2, 0], [1, 3])
    assert slot_ids[0, 0].tolist() == [2 * HEADS * BLOCK_SIZE, (2 * HEADS + 1) * BLOCK_SIZE]
    assert slot_ids[0, 1:, 0].tolist() == [0, 1, 2]


def test_pages_needed_counts_the_largest_layer():
    cache = make_cache()
    cache.add_pages(0, [0, 1, 2])
    cache.append([0], [4])                                     # one block per head and layer
    assert cache.pages_needed([0], [1]).tolist() == [2]        # a new block for each head
    assert cache.pages_needed([0], [0]).tolist() == [1]
    assert cache.pages_in_use([0]).tolist() == [1]


def _tables(cache):
    t = cache.tables
    return [x.clone() for x in (t.block_tables, t.lengths, t.used_blocks)]


def test_too_few_pages_raises_and_changes_nothing():
    cache = make_cache()
    cache.add_pages(0, [5])
    cache.append([0], [3])
    before = _tables(cache)
    with pytest.raises(RuntimeError, match="request slot 0 needs 2 pages .* holds 1; add_pages"):
        cache.append([0], [2])
    assert all(torch.equal(a, b) for a, b in zip(before, _tables(cache)))


def test_stream_longer_than_its_table_raises():
    cache = make_cache(max_blocks_per_stream=2)
    cache.add_pages(0, [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="max_blocks_per_stream=2"):
        cache.append([0], [9])


def test_add_pages_beyond_the_request_limit_raises():
    cache = make_cache()
    with pytest.raises(RuntimeError, match="max_pages_per_request=6"):
        cache.add_pages(0, list(range(7)))


def test_reset_returns_the_pages_and_empties_the_streams():
    cache = make_cache()
    cache.add_pages(0, [4, 9])
    cache.add_pages(1, [2])
    cache.append([0, 1], [3, 2])
    assert cache.reset([1, 0]).tolist() == [2, 4, 9]
    assert cache.tables.lengths.sum() == 0 and cache.tables.used_blocks.sum() == 0
    cache.check_invariants(free_pages=torch.arange(16))


def test_external_pools_are_used_in_place():
    pages, block_size, head_dim = 4, BLOCK_SIZE, 8
    # K/V interleaved per slot ([pages, H, bs, 2 * D]) viewed as head-block pools.
    storage = torch.zeros(pages, HEADS, block_size, 2 * head_dim)
    kv = storage.view(pages * HEADS, block_size, 2, head_dim)
    pools = [(kv[:, :, 0], kv[:, :, 1])]
    cache = PagedStreamCache(1, HEADS, head_dim, pages, 1, pages, block_size=block_size,
                             dtype=torch.float32, kv_memory=[storage], kv_pools=pools)
    cache.add_pages(0, [2])
    slot_ids = cache.append([0], [1])
    keys = torch.ones(1, HEADS, head_dim)
    cache.write(0, slot_ids[0], keys, 2 * keys, torch.tensor([0]))
    assert storage[2, :, 0, :head_dim].eq(1).all() and storage[2, :, 0, head_dim:].eq(2).all()
    assert storage.sum() == HEADS * head_dim * 3


def test_external_pool_of_the_wrong_shape_is_refused():
    keys, values = torch.zeros(4 * HEADS, BLOCK_SIZE, 8), torch.zeros(4, BLOCK_SIZE, 8)
    with pytest.raises(ValueError, match="values pool of layer 0"):
        PagedStreamCache(1, HEADS, 8, 4, 1, 4, block_size=BLOCK_SIZE, dtype=torch.float32,
                         kv_memory=[torch.zeros(4 * HEADS, 2, BLOCK_SIZE, 8)],
                         kv_pools=[(keys, values)])
