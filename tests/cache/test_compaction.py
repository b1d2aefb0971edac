"""Compaction: results equal the padded oracle, live head-blocks are packed into the first
pages, trailing pages can be released, other requests are untouched."""

from __future__ import annotations

import pytest
import torch

from filled_cache import BLOCK_SIZE, HEADS, HEAD_DIM, LAYERS, assert_view_equals, filled_cache
from selection_cases import KINDS, expected_after, expected_low_after, random_selection
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.cache.second_tier import TierView
from vllm_kvcompress.policies.selection import LowBitTier, Selection


@pytest.mark.parametrize("kind", KINDS)
def test_compaction_equals_apply_selection(kind):
    cache, pool = filled_cache([13, 30, 7], spare_pages=2)
    view = cache.gather(1, [2, 0, 1])
    held = cache.bytes_held([2, 0, 1])
    selection = random_selection(view, seed=5, keep_prob=0.5, kind=kind)
    cache.compact(1, [2, 0, 1], selection)
    narrow_state = (torch.zeros(3 * HEADS, HEAD_DIM), torch.zeros(3 * HEADS, dtype=torch.long))
    expected = expected_after(view, selection, HEADS,
                              narrow_state if selection.narrow is not None else None)
    assert_view_equals(cache.gather(1, [2, 0, 1]), expected)
    if selection.demote is not None:
        want, _ = expected_low_after(TierView.empty(3 * HEADS, HEAD_DIM),
                                     torch.zeros(3 * HEADS, HEAD_DIM), view, selection, HEADS)
        assert_low_tier_equals(cache.tier_view(1, [2, 0, 1]), want)
        assert int(cache.tier_tables.lengths[1].sum()) > 0
    if selection.narrow is not None:
        narrowed = (selection.narrow & selection.keep).sum(dim=1)
        assert cache.tier_tables.lengths[1, [2, 0, 1]].flatten().tolist() == narrowed.tolist()
        # What the streams hold: narrow rows cost no more than full tokens (here, with 8
        # channels, their position and score take what the 2 pruned channels free).
        full_token = 2 * HEAD_DIM * 4
        assert cache.bytes_held([2, 0, 1]) <= held - (view.lengths - expected.lengths).sum() * full_token
    cache.check_invariants(pool.free_pages())


def assert_low_tier_equals(got, want):
    assert torch.equal(got.lengths, want.lengths)
    width = got.positions.shape[1]
    assert torch.equal(got.positions, want.positions[:, :width])
    for name in ("keys", "values", "scores"):
        assert torch.equal(getattr(got, name), getattr(want, name)[:, :width]), name


def test_demoted_rows_are_stored_once_and_moved_as_they_are():
    """Three compactions in a row: rows already in the tier keep their bytes (codes,
    params, position, rank) while new ones arrive, the cap drops the lowest ranks, and the
    tier stays in token order after the full tier's blocks."""
    cache, pool = filled_cache([30, 27], spare_pages=2)
    old, balance = TierView.empty(2 * HEADS, HEAD_DIM), torch.zeros(2 * HEADS, HEAD_DIM)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for step in range(3):
        view = cache.gather(0, [1, 0])
        selection = random_selection(view, seed=10 + step, keep_prob=0.6, kind="demote")
        want, balance = expected_low_after(old, balance, view, selection, HEADS)
        cache.compact(0, [1, 0], selection)
        assert_low_tier_equals(cache.tier_view(0, [1, 0]), want)
        assert_view_equals(cache.gather(0, [1, 0]), expected_after(view, selection, HEADS))
        for (stream, position), row in rows_by_position(cache, [1, 0]).items():
            assert torch.equal(seen.setdefault((stream, position), row), row)
        cache.check_invariants(pool.free_pages())
        old = want
    assert int(want.lengths.max()) == 6                  # the cap (TIER.cap) was reached


def rows_by_position(cache, slots):
    """{(stream, position): row bytes} of layer 0's low-bit tiers."""
    low = cache._tier_layer(0, cache.slot_tiers[slots[0]])
    rows = {}
    for r, slot in enumerate(slots):
        for head in range(HEADS):
            length = int(cache.tier_tables.lengths[0, slot, head])
            for t in range(length):
                block = int(cache.tier_tables.block_tables[0, slot, head, t // low.slots_per_block])
                row = low.rows[block, t % low.slots_per_block].clone()
                rows[(r * HEADS + head, int(low.format.positions(row)))] = row
    return rows


def test_a_low_tier_that_outgrows_the_pages_is_refused_before_writing():
    cache, pool = filled_cache([8])                      # 2 pages
    view = cache.gather(0, [0])
    before = [x.clone() for x in cache.cells]
    # 8 bits each way: a row is 24 bytes, 5 per head-block; everything demoted plus a
    # full tier of 7 slots would need 2 + 2 head-blocks per head.
    tier = LowBitTier(8, 8)
    keep = view.positions >= 1
    with pytest.raises(RuntimeError, match="head-blocks after compaction"):
        cache.compact(0, [0], Selection(keep=keep, demote=~keep, second_tier=tier))
    assert all(torch.equal(a, b) for a, b in zip(before, cache.cells))


def test_pages_leaving_a_request_with_rows_are_zeroed():
    """Row bytes read as floats can be NaN, and vLLM's CPU kernel multiplies a padding
    slot's zero weight by its value: the next owner of such a page would attend to NaN."""
    cache, pool = filled_cache([40, 12], spare_pages=2)
    for layer in range(LAYERS):
        view = cache.gather(layer, [0])
        keep = view.positions >= 36
        cache.compact(layer, [0], Selection(keep=keep, demote=~keep, second_tier=LowBitTier(4, 2)))
    owned = cache.tables.request_pages[0, :cache._page_counts[0]].long()
    blocks = (owned[:, None] * HEADS + torch.arange(HEADS)).flatten()
    assert all(cells[blocks].any() for cells in cache.cells)
    pool.free(cache.release_pages(0, int(cache.pages_in_use([0]))))
    pool.free(cache.reset([0]))
    assert not any(cells[blocks].any() for cells in cache.cells)
    cache.check_invariants(pool.free_pages())


def test_live_blocks_are_packed_into_the_first_pages_and_the_rest_released():
    cache, pool = filled_cache([40])                     # 10 blocks per head: 10 pages
    assert cache.pages_in_use([0]).tolist() == [10]
    for layer in range(LAYERS):
        view = cache.gather(layer, [0])
        keep = torch.zeros_like(view.positions, dtype=torch.bool)
        heads = torch.arange(HEADS)[:, None]
        keep[heads, 35 - 3 * heads + torch.arange(5)] = True   # ragged
        keep[0, :9] = True                               # head 0 keeps 14: 4 blocks
        cache.compact(layer, [0], Selection(keep=keep))
    # Blocks per head: 4 + 2 + 2 + 2 (head h keeps its 5 slots ending 3h before the end).
    assert cache.tables.used_blocks[:, 0].tolist() == [10, 10]
    assert cache.pages_in_use([0]).tolist() == [3]
    with pytest.raises(RuntimeError, match="head-blocks in use"):
        cache.release_pages(0, 2)
    released = cache.release_pages(0, 3)
    assert len(released) == 7
    pool.free(released)
    cache.check_invariants(pool.free_pages())


def test_other_requests_are_untouched():
    cache, _ = filled_cache([21, 17, 9])
    before = [cache.gather(layer, [0, 2]) for layer in range(LAYERS)]
    view = cache.gather(0, [1])
    cache.compact(0, [1], random_selection(view, seed=1, keep_prob=0.2, kind="everything"))
    for layer in range(LAYERS):
        for got, want in zip(cache.gather(layer, [0, 2]), before[layer]):
            assert torch.equal(got, want)


def test_keeping_everything_changes_nothing_visible():
    cache, _ = filled_cache([11, 26])
    view = cache.gather(0, [0, 1])
    cache.compact(0, [0, 1], Selection(keep=view.positions >= 0))
    for got, want in zip(cache.gather(0, [0, 1]), view):
        assert torch.equal(got, want)


def test_half_precision_compaction_is_bit_exact_with_apply_selection():
    """Survivors are copied bit for bit or rewritten in float32 and cast back, as
    apply_selection does."""
    cache, _ = filled_cache([19, 26], dtype=torch.float16)
    view = cache.gather(0, [0, 1])
    selection = random_selection(view, seed=3, keep_prob=0.4, kind="everything")
    cache.compact(0, [0, 1], selection)
    got, want = cache.gather(0, [0, 1]), expected_after(view, selection, HEADS)
    width = got.positions.shape[1]
    for name in ("keys", "values", "positions", "scores"):
        assert torch.equal(getattr(got, name), getattr(want, name)[:, :width]), name
    assert torch.equal(got.lengths, want.lengths)
