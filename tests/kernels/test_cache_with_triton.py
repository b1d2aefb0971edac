"""A PagedStreamCache running its Triton kernels gives what one running the torch
reference gives, through append, write, attention with scores, and merging compaction:
over the cache's own pools and over vLLM's LBHNC page tensor in bf16 (the GPU worker's)."""

from __future__ import annotations

import torch

from random_streams import DEVICE
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.cache.pools import head_block_pools
from vllm_kvcompress.policies.selection import Selection

HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, PAGES = 2, 2, 16, 16, 16


def run_steps(impl: str, dtype: torch.dtype = torch.float16, pages: torch.Tensor | None = None):
    """pages: a vLLM layer's KV tensor [PAGES, HEADS, BLOCK_SIZE, 2 * HEAD_DIM] to hold
    the streams (None: the cache's own pools)."""
    gen = torch.Generator().manual_seed(0)
    vllm_memory = {} if pages is None else dict(
        kv_memory=[pages], kv_pools=[head_block_pools(pages, BLOCK_SIZE, HEAD_DIM, False)])
    cache = PagedStreamCache(1, HEADS, HEAD_DIM, num_pages=PAGES, max_requests=2,
                             max_pages_per_request=8, block_size=BLOCK_SIZE,
                             dtype=dtype, device=DEVICE, impl=impl, **vllm_memory)
    cache.add_pages(0, [3, 4, 5, 6])
    cache.add_pages(1, [9, 10, 11])
    outputs = []
    for step_lens, first in (([37, 20], [0, 0]), ([1, 1], [37, 20])):
        slot_ids = cache.append([0, 1], step_lens)
        total = sum(step_lens)
        positions = torch.cat([torch.arange(n) + p for p, n in zip(first, step_lens)])
        cache.write(0, slot_ids[0], torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(DEVICE),
                    torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(DEVICE),
                    positions.to(DEVICE))
        query = torch.randn(total, HEADS * GROUP, HEAD_DIM, generator=gen).to(dtype).to(DEVICE)
        qsl = torch.tensor([0] + step_lens).cumsum(0).int().to(DEVICE)
        outputs.append(cache.attention(0, query, qsl, [0, 1], 0.25, emit_scores=True))
        view = cache.gather(0, [0, 1])
        keep = (torch.rand(view.positions.shape, generator=gen) < 0.5).to(DEVICE)
        slots = torch.arange(view.positions.shape[1], device=DEVICE).expand_as(keep)
        # Merge each evicted slot into the kept slot before it, if any.
        previous_kept = torch.where(keep, slots, -1).cummax(dim=1).values
        cache.compact(0, [0, 1], Selection(
            keep=keep, merge_into=torch.where(keep, slots, previous_kept),
            weights=torch.rand(keep.shape, generator=gen).to(DEVICE)))
    return outputs, cache.gather(0, [0, 1])


def test_triton_cache_equals_reference_cache():
    want_outputs, want_view = run_steps("torch")
    got_outputs, got_view = run_steps("triton")
    for got, want in zip(got_outputs, want_outputs):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert torch.equal(got_view.lengths, want_view.lengths)
    assert torch.equal(got_view.positions, want_view.positions)
    for got, want in zip(got_view, want_view):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_triton_cache_over_lbhnc_pages_in_bf16():
    def pages():
        return torch.zeros(PAGES, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, dtype=torch.bfloat16,
                           device=DEVICE)

    want_pages, got_pages = pages(), pages()
    want_outputs, want_view = run_steps("torch", torch.bfloat16, want_pages)
    got_outputs, got_view = run_steps("triton", torch.bfloat16, got_pages)
    for got, want in zip(got_outputs, want_outputs):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got_view.positions, want_view.positions)
    torch.testing.assert_close(got_pages, want_pages, atol=2e-2, rtol=2e-2)
    # The streams live in vLLM's tensor: page 3's first head-block holds stream 0's keys.
    first = min(BLOCK_SIZE, int(got_view.lengths[0]))
    assert first > 0 and torch.equal(got_pages[3, 0].view(2, BLOCK_SIZE, HEAD_DIM)[0, :first],
                                     got_view.keys[0, :first])
