"""Compaction: results equal the padded oracle, live head-blocks are packed into the first
pages, trailing pages can be released, other requests are untouched."""

from __future__ import annotations

import pytest
import torch

from filled_cache import BLOCK_SIZE, HEADS, HEAD_DIM, LAYERS, assert_view_equals, filled_cache
from selection_cases import KINDS, expected_after, random_selection
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.policies.base import Selection

@pytest.mark.parametrize("kind", KINDS)
def test_compaction_equals_apply_selection(kind):
    cache, pool = filled_cache([13, 30, 7])
    view = cache.gather(1, [2, 0, 1])
    selection = random_selection(view, seed=5, keep_prob=0.5, kind=kind)
    cache.compact(1, [2, 0, 1], selection)
    assert_view_equals(cache.gather(1, [2, 0, 1]), expected_after(view, selection, HEADS))
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
