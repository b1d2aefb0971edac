"""Paged attention over per-head block tables: reference vs plain math, Triton vs reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_oracle import naive_paged_attention
from random_streams import DEVICE, random_paged_streams
from vllm_kvcompress.kernels import paged_attention

# The module, not the op the package exports under the same name.
paged_attention_module = importlib.import_module("vllm_kvcompress.kernels.paged_attention")


@st.composite
def batches(draw, max_len=40):
    """A batch of requests: q_len per request, ragged per-head lengths including it."""
    num_kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4]))
    block_size = draw(st.sampled_from([4, 8]))
    num_requests = draw(st.integers(1, 3))
    query_lens = draw(st.lists(st.integers(0, 6), min_size=num_requests,
                               max_size=num_requests))
    # Past lengths 0 (empty-then-growing) up to a few blocks, differing per head.
    lengths = [[q + draw(st.integers(0, max_len)) for _ in range(num_kv_heads)]
               for q in query_lens]
    return dict(query_lens=query_lens, lengths=lengths, num_kv_heads=num_kv_heads, group=group,
                head_dim=draw(st.sampled_from([8, 12])), block_size=block_size,
                seed=draw(st.integers(0, 2**16)))


def _scores_added(streams, scores_before):
    """Per-stream score increments read back from the pool: [R][H] -> [len]."""
    added = (streams.scores_pool.cpu() - scores_before).view(-1)
    return [[added[slots].double() for slots in row] for row in streams.stream_slots]


@settings(max_examples=60, deadline=None)
@given(batches())
def test_reference_equals_plain_math(batch):
    streams = random_paged_streams(**batch)
    before = streams.scores_pool.clone()
    scale = batch["head_dim"] ** -0.5
    out = paged_attention(streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
                          streams.lengths, streams.request_slots, streams.query_start_loc,
                          scale, scores_pool=streams.scores_pool, impl="torch")
    expected, mass = naive_paged_attention(streams, scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for got_row, want_row in zip(_scores_added(streams, before), mass):
        for got, want in zip(got_row, want_row):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untouched = torch.ones_like(before, dtype=torch.bool).view(-1)
    for row in streams.stream_slots:
        for slots in row:
            untouched[slots] = False
    assert torch.equal(streams.scores_pool.view(-1)[untouched], before.view(-1)[untouched])


@pytest.mark.parametrize(("query_lens", "lengths"), [
    ([11], [[11, 11]]),           # a fresh prompt in three query chunks
    ([10, 1], [[30, 14], [9, 3]]),  # a chunk after a ragged compressed past, plus a decode
    ([9], [[9, 25]]),             # one head's past longer than the other's whole stream
])
def test_reference_in_query_chunks_equals_plain_math(monkeypatch, query_lens, lengths):
    """Prefill chunks longer than QUERY_CHUNK: each query chunk reads keys only up to its
    last query's slot, with per-head offsets."""
    monkeypatch.setattr(paged_attention_module, "QUERY_CHUNK", 4)
    streams = random_paged_streams(5, query_lens, lengths, 2, 3, 8, 4)
    before = streams.scores_pool.clone()
    out = paged_attention(streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
                          streams.lengths, streams.request_slots, streams.query_start_loc,
                          0.3, scores_pool=streams.scores_pool, impl="torch")
    expected, mass = naive_paged_attention(streams, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for got_row, want_row in zip(_scores_added(streams, before), mass):
        for got, want in zip(got_row, want_row):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_scores_pool_scores_untouched():
    streams = random_paged_streams(0, [3], [[9, 5]], 2, 2, 8, 4)
    out = paged_attention(streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
                          streams.lengths, streams.request_slots, streams.query_start_loc, 0.3,
                          impl="torch")
    expected, _ = naive_paged_attention(streams, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# Triton (interpreted on CPU: keep these small).
TRITON_CASES = [
    # query_lens, lengths, H, G, D, block_size
    ([1, 1, 1], [[5, 17], [33, 1], [16, 16]], 2, 4, 16, 16),        # decode, ragged
    ([7, 1], [[7, 40], [3, 20]], 2, 2, 20, 16),                      # empty-then-growing prefill
    ([20, 0, 3], [[50, 20], [4, 9], [3, 70]], 2, 1, 32, 32),         # chunk, idle request
    ([5], [[37, 64, 6, 33]], 4, 3, 8, 16),                           # odd group size
]


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_equals_reference(case, dtype):
    query_lens, lengths, heads, group, head_dim, block_size = case
    streams = random_paged_streams(1, query_lens, lengths, heads, group, head_dim, block_size,
                                   dtype=dtype, device=DEVICE)
    scores_ref = streams.scores_pool.clone()
    args = (streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
            streams.lengths, streams.request_slots, streams.query_start_loc, head_dim ** -0.5)
    want = paged_attention(*args, scores_pool=scores_ref, impl="torch")
    got = paged_attention(*args, scores_pool=streams.scores_pool, impl="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(streams.scores_pool, scores_ref, atol=tol, rtol=tol)


def test_strided_pool_views():
    """Keys stored transposed in each block (vLLM's CPU layout) and K/V interleaved per slot
    (its GPU layout) read the same as contiguous pools."""
    streams = random_paged_streams(2, [4, 1], [[12, 40], [9, 2]], 2, 2, 16, 16, device=DEVICE)
    args = (streams.block_tables, streams.lengths, streams.request_slots,
            streams.query_start_loc, 0.25)
    want = paged_attention(streams.query, streams.key_pool, streams.value_pool, *args,
                           impl="torch")
    transposed_keys = streams.key_pool.transpose(1, 2).contiguous().transpose(1, 2)
    interleaved = torch.stack([streams.key_pool, streams.value_pool], dim=2).contiguous()
    for keys, values in ((transposed_keys, streams.value_pool),
                         (interleaved[:, :, 0], interleaved[:, :, 1])):
        assert not keys.is_contiguous()
        for impl in ("torch", "triton"):
            got = paged_attention(streams.query, keys, values, *args, impl=impl)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_equals_reference_on_gpu_at_scale(dtype):
    gen = torch.Generator().manual_seed(3)
    heads, group = 8, 4
    query_lens = [1] * 6 + [128, 37]
    lengths = [[q + int(torch.randint(0, 3000, (1,), generator=gen)) for _ in range(heads)]
               for q in query_lens]
    streams = random_paged_streams(3, query_lens, lengths, heads, group, 128, 32, dtype=dtype,
                                   device="cuda")
    scores_ref = streams.scores_pool.clone()
    args = (streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
            streams.lengths, streams.request_slots, streams.query_start_loc, 128 ** -0.5)
    want = paged_attention(*args, scores_pool=scores_ref, impl="torch")
    got = paged_attention(*args, scores_pool=streams.scores_pool, impl="triton")
    # bf16 probabilities enter the P.V product in Triton, float32 ones in the reference.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(streams.scores_pool, scores_ref, atol=1e-2, rtol=1e-2)
