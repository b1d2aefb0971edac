"""Prefix sharing: a request reading another request's full pages (vLLM's prefix cache)
sees their tokens, never writes them, and compacts into pages of its own."""

from __future__ import annotations

import pytest
import torch

from filled_cache import BLOCK_SIZE, HEADS, LAYERS, assert_view_equals, filled_cache
from selection_cases import expected_after, random_selection
from vllm_kvcompress.cache.schedule import CompressionSchedule


def pool_snapshot(cache, pages: list[int]) -> list[torch.Tensor]:
    rows = torch.tensor([p * HEADS + h for p in pages for h in range(HEADS)])
    return [torch.cat([layer.keys[rows].flatten(), layer.values[rows].flatten(),
                       layer.positions[rows].flatten().float()])
            for layer in cache.layers]


def test_uncompressed_pages_hold_every_heads_block_in_page_order():
    cache, _ = filled_cache([3 * BLOCK_SIZE + 1])
    pages = cache.tables.request_pages[0, :4]
    for head in range(HEADS):
        blocks = cache.tables.block_tables[:, 0, head, :4]
        assert torch.equal(blocks, (pages * HEADS + head).expand(LAYERS, -1))


def test_a_shared_prefix_is_read_and_never_written():
    cache, pool = filled_cache([5 * BLOCK_SIZE + 2])            # request 0 writes 6 pages
    shared = cache.tables.request_pages[0, :3].tolist()          # 3 full pages, hashed
    before = pool_snapshot(cache, shared)
    cache.add_pages(1, shared + pool.allocate(3).tolist())
    cache.share_prefix(1, 3 * BLOCK_SIZE)
    for layer in range(LAYERS):                                  # the same tokens as request 0
        mine, theirs = cache.gather(layer, [1]), cache.gather(layer, [0], 3 * BLOCK_SIZE)
        assert mine.lengths.tolist() == [3 * BLOCK_SIZE] * HEADS
        assert_view_equals(mine, theirs._replace(lengths=mine.lengths))
    cache.check_invariants(pool.free_pages())                    # shared pages held twice

    slot_ids = cache.append([1], [BLOCK_SIZE + 3])               # goes to its own pages
    assert not set((slot_ids // BLOCK_SIZE // HEADS).unique().tolist()) & set(shared)
    for layer in range(LAYERS):
        cache.write(layer, slot_ids[layer], torch.randn(BLOCK_SIZE + 3, HEADS, 8),
                    torch.randn(BLOCK_SIZE + 3, HEADS, 8),
                    torch.arange(3 * BLOCK_SIZE, 4 * BLOCK_SIZE + 3))
    cache.drop_leading_pages(1, 3)                               # its first compression
    assert cache.shared_pages[1] == 0
    for layer in range(LAYERS):
        view = cache.gather(layer, [1])
        selection = random_selection(view, seed=layer, keep_prob=0.5, kind="evict")
        cache.compact(layer, [1], selection)
        assert_view_equals(cache.gather(layer, [1]), expected_after(view, selection, HEADS))
    assert all(torch.equal(a, b) for a, b in zip(pool_snapshot(cache, shared), before))
    cache.check_invariants(pool.free_pages())


def test_share_prefix_and_drop_refuse_what_they_cannot_do():
    cache, pool = filled_cache([2 * BLOCK_SIZE])
    cache.add_pages(1, pool.allocate(2))
    with pytest.raises(ValueError, match="whole pages"):
        cache.share_prefix(1, BLOCK_SIZE + 1)
    with pytest.raises(RuntimeError, match="none to compact into"):
        cache.drop_leading_pages(1, 2)


def test_schedule_pages_with_a_shared_prefix():
    schedule = CompressionSchedule(budget=64, interval=16, block_size=32, shared_prefix=True)
    private = CompressionSchedule(budget=64, interval=16, block_size=32)
    # The prompt step that compresses first: 1000 tokens in 32 pages, 31 of them full
    # and read-only, plus fresh pages for the 79 tokens compression keeps at most.
    assert private.pages_for_step(0, 1000, 1000, 0) == 32
    assert schedule.pages_for_step(0, 1000, 1000, 0) == 31 + 4
    assert schedule.shared_pages(1000) == 31 and private.shared_pages(1000) == 0
    # Afterwards both keep the bound only; before, every token.
    assert schedule.pages_for_step(1000, 1, 1000, 1000) == 4
    assert schedule.pages_for_step(300, 200, 1000, 0) == 16
