"""vLLM's CPU attention kernel over per-head streams: the cache layout is the one vLLM's own
writer produces, and the kernel's output equals the torch reference on compressed streams
(different lengths per head) with decode steps and prefill chunks in one batch."""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops

from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.cache.pools import head_block_pools
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.vllm_plugin.cpu_attention import (
    ISA,
    NativeCPUAttention,
    native_attention_supported,
)

PAGES, HEADS, GROUP, BLOCK, DIM, LAYERS = 48, 3, 3, 32, 64, 2

pytestmark = pytest.mark.skipif(not native_attention_supported(torch.float32, DIM, BLOCK),
                                reason="vLLM's portable CPU attention kernel is built for x86")


def test_head_block_pools_read_what_vllms_writer_stores():
    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.zeros(PAGES, HEADS, BLOCK, 2 * DIM)
    key_cache, value_cache = kv_cache.view(PAGES, HEADS, 2 * BLOCK, DIM).chunk(2, dim=2)
    slots = torch.randperm(PAGES * BLOCK, generator=gen)[:50]
    keys, values = (torch.randn(50, HEADS, DIM, generator=gen) for _ in range(2))
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, ISA)
    key_pool, value_pool = head_block_pools(kv_cache, BLOCK, DIM, keys_transposed=True)
    page, offset = slots // BLOCK, slots % BLOCK
    for head in range(HEADS):
        assert torch.equal(key_pool[page * HEADS + head, offset], keys[:, head])
        assert torch.equal(value_pool[page * HEADS + head, offset], values[:, head])


def _compressed_cache(dtype: torch.dtype, gen: torch.Generator):
    """Three requests whose streams were compressed to different lengths per head, then got
    this step's tokens: two decodes and a 17-token prefill chunk."""
    kv_caches = [torch.randn(PAGES, HEADS, BLOCK, 2 * DIM, generator=gen).to(dtype)
                 for _ in range(LAYERS)]
    cache = PagedStreamCache(
        LAYERS, HEADS, DIM, PAGES, max_requests=4, max_pages_per_request=PAGES,
        block_size=BLOCK, dtype=dtype,
        kv_memory=kv_caches,
        kv_pools=[head_block_pools(kv, BLOCK, DIM, keys_transposed=True) for kv in kv_caches])
    slots, prompt_lens = [2, 0, 3], [70, 140, 5]
    pages = iter(torch.randperm(PAGES, generator=gen).tolist())
    for slot, length in zip(slots, prompt_lens):
        cache.add_pages(slot, [next(pages) for _ in range(length // BLOCK + 2)])

    def append_and_write(lengths: list[int], start: list[int]) -> None:
        slot_ids = cache.append(slots, lengths)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(start, lengths)])
        for layer in range(LAYERS):
            keys, values = (torch.randn(len(positions), HEADS, DIM, generator=gen).to(dtype)
                            for _ in range(2))
            cache.write(layer, slot_ids[layer], keys, values, positions)

    append_and_write(prompt_lens, [0, 0, 0])
    for layer in range(LAYERS):
        view = cache.gather(layer, slots)
        live = torch.arange(view.keys.shape[1]) < view.lengths[:, None]
        keep = live & (torch.rand(live.shape, generator=gen) < 0.5)
        keep[:, 0] = live[:, 0]
        cache.compact(layer, slots, Selection(keep=keep))
    query_lens = [1, 17, 1]
    append_and_write(query_lens, prompt_lens)
    return cache, kv_caches, torch.tensor(slots), torch.tensor([0, 1, 18, 19], dtype=torch.int32)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_native_kernel_equals_torch_reference(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    cache, kv_caches, slots, query_start_loc = _compressed_cache(dtype, gen)
    lengths = cache.tables.lengths[:, slots]
    assert (lengths != lengths[..., :1]).any(), "heads should hold different lengths"
    native = NativeCPUAttention(kv_caches, HEADS * GROUP, HEADS, DIM, BLOCK)
    num_tokens = int(query_start_loc[-1])
    step = native.plan(query_start_loc, num_tokens, cache.tables.block_tables,
                       cache.tables.lengths, slots)
    for layer in range(LAYERS):
        query = torch.randn(num_tokens, HEADS * GROUP, DIM, generator=gen).to(dtype)
        got = native.forward(layer, query, step, DIM ** -0.5)
        want = cache.attention(layer, query, query_start_loc, slots, DIM ** -0.5)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
