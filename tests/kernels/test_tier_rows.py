"""Second-tier rows (packed low-bit, narrow-key), attention over them, and joining it to
the full tier's softmax (paged_attention's prior and lse_out; scores emitted into narrow
rows): reference vs plain math, Triton vs reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_oracle import naive_paged_attention
from random_streams import DEVICE, random_paged_streams
from vllm_kvcompress.kernels import paged_attention
from vllm_kvcompress.kernels.low_bit import LowBitFormat, pack_planes, unpack_planes
from vllm_kvcompress.kernels.narrow_key import NarrowKeyFormat
from vllm_kvcompress.kernels.tier_attention import add_tier_scores, tier_attention


# ---------------------------------------------------------------------------- the format

@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_planes_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    planes = pack_planes(codes, bits)
    assert planes.shape == (5, bits * 8)
    assert torch.equal(unpack_planes(planes, bits), codes)


@pytest.mark.parametrize(("head_size", "key_bits", "value_bits"), [(64, 3, 3), (64, 4, 2), (8, 1, 8)])
def test_rows_read_back_within_half_a_step(head_size, key_bits, value_bits):
    fmt = LowBitFormat(head_size, key_bits, value_bits)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 40, head_size, generator=gen)
    balance = 0.5 + torch.rand(40, head_size, generator=gen)
    positions, scores = torch.arange(40) * 3, torch.rand(40, generator=gen)
    rows = fmt.encode(keys.bfloat16(), values, positions, scores, balance)
    assert rows.dtype == torch.uint8 and rows.shape == (40, fmt.row_bytes)
    assert torch.equal(fmt.positions(rows), positions.int()) and torch.equal(fmt.scores(rows), scores)
    read_keys, read_values = fmt.decode(rows, balance)
    stored_keys = fmt.decode(rows)[0]                    # k * b, as stored
    assert torch.equal(read_keys, stored_keys / balance)
    for stored, read, bits in ((keys.bfloat16().float() * balance, stored_keys, key_bits),
                               (values, read_values, value_bits)):
        step = (stored.amax(1, keepdim=True) - stored.amin(1, keepdim=True)) / (2 ** bits - 1)
        # Half a step, plus float16 rounding of the step and the minimum.
        assert ((read - stored).abs() <= step / 2 + 2e-3 * (stored.abs().amax(1, keepdim=True) + step)).all()
        assert max(len(row.unique()) for row in read) <= 2 ** bits
    assert torch.equal(fmt.round_trip(keys.bfloat16(), values, balance)[0], read_keys)


def test_a_constant_token_reads_back_constant():
    fmt = LowBitFormat(8, 2, 2)
    row = fmt.encode(torch.full((1, 8), 1.5), torch.zeros(1, 8), torch.zeros(1), torch.zeros(1))
    keys, values = fmt.decode(row)
    assert torch.equal(keys, torch.full((1, 8), 1.5)) and torch.equal(values, torch.zeros(1, 8))


def test_row_sizes_and_head_blocks():
    fmt = LowBitFormat(64, 3, 3)
    assert fmt.row_bytes == 48 + 16                       # codes + params, position, score
    assert fmt.slots_per_block(2 * 32 * 64 * 2) == 128    # a bf16 head-block of 32 tokens
    assert LowBitFormat(64, 8, 8).slots_per_block(8192) == 56
    assert LowBitFormat(8, 3, 2).row_bytes % 4 == 0        # codes padded for aligned fields
    cells = torch.zeros(3, 8192, dtype=torch.uint8)
    pool = fmt.row_pool(cells)
    assert pool.shape == (3, 128, 64)
    pool[1, 5] = 7
    assert cells[1, 5 * 64:6 * 64].eq(7).all() and cells.sum() == 7 * 64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_narrow_rows_keep_the_kept_channels_exactly(dtype):
    fmt = NarrowKeyFormat(64, 39, dtype)                  # ThinK at 0.4: 25 channels pruned
    assert fmt.row_bytes == (208 if dtype == torch.bfloat16 else 412) + 8
    assert fmt.slots_per_block(2 * 32 * 64 * dtype.itemsize) == (37 if dtype == torch.bfloat16 else 39)
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 10, 64, generator=gen).to(dtype)
    scales = torch.ones(10, 64)
    scales[:, torch.randperm(64, generator=gen)[:25]] = 0.0
    rows = fmt.encode(keys, values, torch.arange(10), torch.full((10,), 0.5), scales)
    read_keys, read_values = fmt.decode(rows, scales)
    assert torch.equal(read_keys, torch.where(scales > 0, keys.float(), 0.0))
    assert torch.equal(read_values, values.float())
    assert torch.equal(fmt.positions(rows), torch.arange(10, dtype=torch.int32))
    assert torch.equal(fmt.scores(rows), torch.full((10,), 0.5))


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="key_bits=0"):
        LowBitFormat(64, 0, 3)
    with pytest.raises(ValueError, match="value_bits=9"):
        LowBitFormat(64, 3, 9)
    with pytest.raises(ValueError, match="multiple of 8"):
        LowBitFormat(12, 3, 3)
    with pytest.raises(ValueError, match="kept_channels=0"):
        NarrowKeyFormat(64, 0, torch.float32)


# ---------------------------------------------------------------------------- attention

def random_low_tiers(seed, slots, lengths, num_slots, num_kv_heads, head_dim, fmt,
                     device="cpu"):
    """Low-bit tiers of requests in table rows `slots` with lengths[r][h] rows, their head-
    blocks scattered over a pool; returns (row_pool, tables, lengths, balance, dense keys
    [R][H] and values as read back, float64)."""
    gen = torch.Generator().manual_seed(seed)
    cell_bytes = 2 * 8 * head_dim * 4
    per_block = fmt.slots_per_block(cell_bytes)
    blocks_of = [[-(-n // per_block) for n in row] for row in lengths]
    num_blocks = sum(map(sum, blocks_of)) + 2
    pool = fmt.row_pool(torch.randint(0, 256, (num_blocks, cell_bytes), generator=gen,
                                      dtype=torch.uint8))
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.randint(0, num_blocks, (num_slots, num_kv_heads, max(max(map(max, blocks_of)), 1)),
                           generator=gen, dtype=torch.int32)
    table_lengths = torch.randint(0, 3, (num_slots, num_kv_heads), generator=gen, dtype=torch.int32)
    balance = 0.5 + torch.rand(num_slots, num_kv_heads, head_dim, generator=gen)
    if isinstance(fmt, NarrowKeyFormat):   # each stream keeps kept_channels of its channels
        pruned = torch.rand(num_slots, num_kv_heads, head_dim, generator=gen).argsort(dim=-1)
        balance = torch.ones(num_slots, num_kv_heads, head_dim).scatter(
            -1, pruned[..., :head_dim - fmt.kept_channels], 0.0)
    dense_keys, dense_values = [], []
    for r, slot in enumerate(slots):
        keys_row, values_row = [], []
        for h in range(num_kv_heads):
            n = lengths[r][h]
            blocks = [order.pop() for _ in range(blocks_of[r][h])]
            tables[slot, h, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            table_lengths[slot, h] = n
            t = torch.arange(n)
            keys, values = torch.randn(2, n, head_dim, generator=gen)
            rows = fmt.encode(keys, values, t, torch.rand(n, generator=gen),
                              balance[slot, h].expand(n, -1))
            pool[torch.tensor(blocks, dtype=torch.long)[t // per_block], t % per_block] = rows
            read_keys, read_values = fmt.decode(rows, balance[slot, h])
            keys_row.append(read_keys.double())
            values_row.append(read_values.double())
        dense_keys.append(keys_row)
        dense_values.append(values_row)
    return (pool.to(device), tables.to(device), table_lengths.to(device), balance.to(device),
            dense_keys, dense_values)


@st.composite
def tiered_batches(draw):
    num_kv_heads = draw(st.integers(1, 3))
    num_requests = draw(st.integers(1, 3))
    query_lens = draw(st.lists(st.integers(1, 5), min_size=num_requests, max_size=num_requests))
    low = [[draw(st.sampled_from([0, 1, 7, 30])) for _ in range(num_kv_heads)] for _ in query_lens]
    full = [[q + draw(st.integers(0, 20)) for _ in range(num_kv_heads)] for q in query_lens]
    return dict(query_lens=query_lens, low=low, full=full, num_kv_heads=num_kv_heads,
                group=draw(st.sampled_from([1, 3])), seed=draw(st.integers(0, 2**16)),
                bits=draw(st.sampled_from([(3, 3), (2, 4), (8, 1), "narrow"])))


def tiered_streams(batch, device="cpu", block_size=4):
    head_dim = 16
    streams = random_paged_streams(batch["seed"], batch["query_lens"], batch["full"],
                                   batch["num_kv_heads"], batch["group"], head_dim, block_size,
                                   device=device)
    fmt = (NarrowKeyFormat(head_dim, 10, torch.float32) if batch["bits"] == "narrow"
           else LowBitFormat(head_dim, *batch["bits"]))
    low = random_low_tiers(batch["seed"] + 1, streams.request_slots.tolist(), batch["low"],
                           streams.block_tables.shape[0], batch["num_kv_heads"], head_dim, fmt,
                           device)
    return streams, fmt, low


def naive_low_attention(streams, low, scale):
    """(out, lse) of every query over its stream's whole low-bit tier, float64."""
    _, _, _, _, dense_keys, dense_values = low
    query = streams.query.double().cpu()
    num_kv_heads = len(dense_keys[0])
    group = query.shape[1] // num_kv_heads
    qsl = streams.query_start_loc.tolist()
    out = torch.zeros_like(query)
    lse = torch.full(query.shape[:2], -torch.inf, dtype=torch.float64)
    for r in range(len(qsl) - 1):
        for i in range(qsl[r], qsl[r + 1]):
            for q_head in range(query.shape[1]):
                keys, values = dense_keys[r][q_head // group], dense_values[r][q_head // group]
                if len(keys):
                    logits = keys @ query[i, q_head] * scale
                    lse[i, q_head] = torch.logsumexp(logits, 0)
                    out[i, q_head] = torch.softmax(logits, 0) @ values
    return out, lse


@settings(max_examples=40, deadline=None)
@given(tiered_batches())
def test_low_bit_attention_reference_equals_plain_math(batch):
    streams, fmt, low = tiered_streams(batch)
    pool, tables, lengths, balance, *_ = low
    out, lse = tier_attention(streams.query, pool, fmt, tables, lengths, balance,
                                 streams.request_slots, streams.query_start_loc, 0.25, impl="torch")
    want_out, want_lse = naive_low_attention(streams, low, 0.25)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(tiered_batches())
def test_attention_with_a_prior_is_one_softmax_over_both_tiers(batch):
    """paged_attention(prior=low tier's partial) equals plain attention over the low tier
    plus the causal full tier; scores emitted are probabilities over both."""
    streams, fmt, low = tiered_streams(batch)
    pool, tables, lengths, balance, low_keys, low_values = low
    scale = 0.25
    prior = tier_attention(streams.query, pool, fmt, tables, lengths, balance,
                              streams.request_slots, streams.query_start_loc, scale, impl="torch")
    before = streams.scores_pool.clone()
    out = paged_attention(streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
                          streams.lengths, streams.request_slots, streams.query_start_loc, scale,
                          scores_pool=streams.scores_pool, impl="torch", prior=prior)
    full_out, full_mass = naive_paged_attention(streams, scale)
    # Join the two partials by hand: weights exp(lse) of each side.
    low_out, low_lse = naive_low_attention(streams, low, scale)
    full_lse = naive_full_lse(streams, scale)
    total = torch.logaddexp(low_lse, full_lse)
    want = (torch.exp(low_lse - total)[..., None] * low_out
            + torch.exp(full_lse - total)[..., None] * full_out)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # Emitted mass shrinks by the full tier's share of each query's softmax.
    assert (streams.scores_pool - before).sum() <= sum(m.sum() for row in full_mass for m in row) + 1e-4
    # The joint log-sum-exp, and the second tier's own share of each softmax.
    lse = torch.empty(streams.query.shape[:2])
    paged_attention(streams.query, streams.key_pool, streams.value_pool, streams.block_tables,
                    streams.lengths, streams.request_slots, streams.query_start_loc, scale,
                    impl="torch", prior=prior, lse_out=lse)
    torch.testing.assert_close(lse.double(), total, atol=1e-5, rtol=1e-5)
    pool[..., fmt.position_offset + 4:] = 0                    # every row's score: 0.0
    add_tier_scores(streams.query, pool, fmt, tables, lengths, balance, streams.request_slots,
                    streams.query_start_loc, scale, lse)
    low_share = torch.exp(low_lse - total).nan_to_num(0.0).sum()
    torch.testing.assert_close(fmt.scores(pool).sum().double(), low_share, atol=1e-4, rtol=1e-4)


def naive_full_lse(streams, scale):
    query = streams.query.double().cpu()
    num_kv_heads = len(streams.dense_keys[0])
    group = query.shape[1] // num_kv_heads
    qsl = streams.query_start_loc.tolist()
    lse = torch.zeros(query.shape[:2], dtype=torch.float64)
    for r in range(len(qsl) - 1):
        q_len = qsl[r + 1] - qsl[r]
        for q_head in range(query.shape[1]):
            keys = streams.dense_keys[r][q_head // group]
            for i in range(q_len):
                visible = len(keys) - q_len + i + 1
                lse[qsl[r] + i, q_head] = torch.logsumexp(keys[:visible] @ query[qsl[r] + i, q_head] * scale, 0)
    return lse


@pytest.mark.parametrize("seed", range(4))
def test_triton_low_bit_attention_and_prior_equal_the_reference(seed):
    batch = dict(query_lens=[1, 4, 1], low=[[33, 0], [5, 70], [0, 0]], full=[[9, 30], [20, 4], [1, 6]],
                 num_kv_heads=2, group=3, seed=seed, bits=[(3, 3), (2, 4), (8, 1), (1, 1)][seed])
    streams, fmt, low = tiered_streams(batch, device=DEVICE, block_size=16)
    pool, tables, lengths, balance, *_ = low
    args = (streams.query, pool, fmt, tables, lengths, balance, streams.request_slots,
            streams.query_start_loc, 0.25)
    ref_out, ref_lse = tier_attention(*args, impl="torch")
    tri_out, tri_lse = tier_attention(*args, impl="triton")
    torch.testing.assert_close(tri_out, ref_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(tri_lse == -torch.inf, ref_lse == -torch.inf)
    torch.testing.assert_close(tri_lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0),
                               atol=1e-5, rtol=1e-5)
    outputs, scores = [], []
    for impl in ("torch", "triton"):
        pool_scores = streams.scores_pool.clone()
        outputs.append(paged_attention(streams.query, streams.key_pool, streams.value_pool,
                                       streams.block_tables, streams.lengths,
                                       streams.request_slots, streams.query_start_loc, 0.25,
                                       scores_pool=pool_scores, impl=impl, prior=(ref_out, ref_lse)))
        scores.append(pool_scores)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)
    lses = [torch.empty(streams.query.shape[:2], device=DEVICE) for _ in "ab"]
    for impl, lse in zip(("torch", "triton"), lses):
        paged_attention(streams.query, streams.key_pool, streams.value_pool,
                        streams.block_tables, streams.lengths, streams.request_slots,
                        streams.query_start_loc, 0.25, impl=impl, prior=(ref_out, ref_lse),
                        lse_out=lse)
    torch.testing.assert_close(lses[1], lses[0], atol=1e-5, rtol=1e-5)
