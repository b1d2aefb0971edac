"""PagedStreamCache.attention: queries of each request over its compressed streams plus
this step's tokens, against plain math over the gathered streams."""

from __future__ import annotations

import pytest
import torch

from selection_cases import random_selection
from vllm_kvcompress.cache import PagedStreamCache, PagePool

LAYERS, HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 2, 2, 3, 8, 4


def plain_attention(view, query, query_lens, scale):
    """Per request r (streams r*H .. r*H + H - 1), per query head, per query: softmax over
    the stream's slots up to the query's own. Returns outputs and per-slot mass [N, T]."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    mass = torch.zeros(view.positions.shape, dtype=torch.float64)
    start = 0
    for r, q_len in enumerate(query_lens):
        for q_head in range(HEADS * GROUP):
            n = r * HEADS + q_head // GROUP
            length = int(view.lengths[n])
            for i in range(q_len):
                visible = length - q_len + i + 1
                keys, values = view.keys[n, :visible].double(), view.values[n, :visible].double()
                probs = torch.softmax(keys @ query[start + i, q_head].double() * scale, 0)
                out[start + i, q_head] = probs @ values
                mass[n, :visible] += probs
        start += q_len
    return out, mass


@pytest.mark.parametrize("step_lens", [[1, 1, 1], [5, 1, 9], [0, 3, 1]])
def test_attention_over_compressed_streams(step_lens):
    gen = torch.Generator().manual_seed(sum(step_lens))
    cache = PagedStreamCache(LAYERS, HEADS, HEAD_DIM, num_pages=60, max_requests=5,
                             max_pages_per_request=20, block_size=BLOCK_SIZE,
                             dtype=torch.float32)
    pool = PagePool(60)
    # Requests in slots 3 and 0 have a compressed past; slot 4 starts empty.
    past = {3: 23, 0: 14}
    for slot, need in zip(past, cache.pages_needed(list(past), list(past.values())).tolist()):
        cache.add_pages(slot, pool.allocate(need))
    _append_and_write(cache, list(past), list(past.values()), [0, 0], gen)
    for layer in range(LAYERS):
        view = cache.gather(layer, list(past))
        cache.compact(layer, list(past), random_selection(view, seed=layer, keep_prob=0.5))

    slots = [3, 4, 0]
    for slot, need in zip(slots, cache.pages_needed(slots, step_lens).tolist()):
        cache.add_pages(slot, pool.allocate(max(0, need - cache._page_counts[slot])))
    _append_and_write(cache, slots, step_lens, [past.get(s, 0) for s in slots], gen)
    query = torch.randn(sum(step_lens), HEADS * GROUP, HEAD_DIM, generator=gen)
    query_start_loc = torch.tensor([0] + step_lens).cumsum(0).int()
    scale = HEAD_DIM ** -0.5
    for layer in range(LAYERS):
        before = cache.gather(layer, slots)
        got = cache.attention(layer, query, query_start_loc, slots, scale, emit_scores=True)
        want, mass = plain_attention(before, query, step_lens, scale)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.gather(layer, slots).scores.double(),
                                   before.scores.double() + mass, atol=1e-5, rtol=1e-5)
    cache.check_invariants(pool.free_pages())


def _append_and_write(cache, slots, counts, first_positions, gen):
    slot_ids = cache.append(slots, counts)
    total = sum(counts)
    positions = torch.cat([torch.arange(n) + p for p, n in zip(first_positions, counts)])
    for layer in range(LAYERS):
        cache.write(layer, slot_ids[layer], torch.randn(total, HEADS, HEAD_DIM, generator=gen),
                    torch.randn(total, HEADS, HEAD_DIM, generator=gen), positions)
