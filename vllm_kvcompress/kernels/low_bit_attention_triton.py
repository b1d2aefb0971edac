"""Triton kernel for `tier_attention` over low-bit rows.

One program per (request, KV head, tile of BLOCK_Q queries); rows = the tile's queries
times the group's query heads, as in paged_attention_triton. It walks the stream's rows
TILE at a time (a tile may span head-blocks: each row finds its own), decodes keys and
values from their bit planes in registers (kernels/low_bit.py's layout), and keeps an online
softmax; it writes the partial output and its log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.kernels.paged_attention_triton import MIN_ROWS, PREFILL_ROWS

# Rows decoded per iteration (tl.dot needs >= 16).
TILE = 32


@triton.jit
def _decode(row_ptr, row_ok, dims, dim_ok, codes_offset, params_offset, BITS: tl.constexpr,
            PLANE_BYTES: tl.constexpr):
    """[TILE, BLOCK_D] float32 of the rows at byte pointers row_ptr [TILE] (zeros where not
    row_ok): codes from BITS planes at codes_offset, step and minimum (float16) at
    params_offset."""
    codes = tl.zeros([row_ptr.shape[0], dims.shape[0]], dtype=tl.int32)
    for j in tl.static_range(BITS):
        byte = tl.load(row_ptr[:, None] + codes_offset + j * PLANE_BYTES + (dims // 8)[None, :],
                       mask=row_ok[:, None] & dim_ok[None, :], other=0).to(tl.int32)
        codes += ((byte >> (dims % 8)[None, :]) & 1) << j
    params = (row_ptr + params_offset).to(tl.pointer_type(tl.float16))
    step = tl.load(params, mask=row_ok, other=0.0).to(tl.float32)
    low = tl.load(params + 1, mask=row_ok, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * step[:, None] + low[:, None]


@triton.jit
def _low_bit_attention_kernel(
        q_ptr, pool_ptr, table_ptr, len_ptr, scales_ptr, req_slot_ptr, qsl_ptr, out_ptr,
        lse_ptr, scale, head_dim,
        q_s_tok, q_s_head, out_s_tok, out_s_head, lse_s_tok, lse_s_head,
        pool_s_block, pool_s_slot, table_s_req, table_s_head, len_s_req, len_s_head,
        scale_s_req, scale_s_head,
        values_offset, params_offset,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr,
        SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BITS: tl.constexpr,
        VALUE_BITS: tl.constexpr, PLANE_BYTES: tl.constexpr):
    request, kv_head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    req_slot = tl.load(req_slot_ptr + request).to(tl.int64)
    q_start = tl.load(qsl_ptr + request).to(tl.int64)
    q_len = tl.load(qsl_ptr + request + 1).to(tl.int64) - q_start
    length = tl.load(len_ptr + req_slot * len_s_req + kv_head * len_s_head).to(tl.int64)
    table_row = table_ptr + req_slot * table_s_req + kv_head * table_s_head

    rows = tl.arange(0, ROWS)
    q_idx = tile * BLOCK_Q + rows // GROUP
    q_head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * q_s_tok + q_head[:, None] * q_s_head
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    balance = tl.load(scales_ptr + req_slot * scale_s_req + kv_head * scale_s_head + dims,
                      mask=dim_ok, other=1.0)
    balance = tl.where(balance != 0, balance, 1.0)
    length = tl.where(tile * BLOCK_Q < q_len, length, 0)

    row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(0, length, TILE):
        t = start + tl.arange(0, TILE)
        t_ok = t < length
        head_block = tl.load(table_row + t // SLOTS, mask=t_ok, other=0).to(tl.int64)
        row_ptr = pool_ptr + head_block * pool_s_block + (t % SLOTS) * pool_s_slot
        keys = _decode(row_ptr, t_ok, dims, dim_ok, 0, params_offset, KEY_BITS, PLANE_BYTES)
        keys = keys / balance[None, :]
        logits = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
        logits = tl.where(row_ok[:, None] & t_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(logits - safe_max[:, None])
        rescale = tl.exp(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        values = _decode(row_ptr, t_ok, dims, dim_ok, values_offset, params_offset + 4,
                         VALUE_BITS, PLANE_BYTES)
        acc = acc * rescale[:, None] + tl.dot(probs, values, input_precision="ieee")
        row_max = new_max

    present = row_sum > 0
    out = acc / tl.where(present, row_sum, 1.0)[:, None]
    lse = tl.where(present, row_max + tl.log(tl.where(present, row_sum, 1.0)), float("-inf"))
    tl.store(out_ptr + (q_start + q_idx)[:, None] * out_s_tok + q_head[:, None] * out_s_head
             + dims[None, :], out, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + (q_start + q_idx) * lse_s_tok + q_head * lse_s_head, lse, mask=row_ok)


def low_bit_attention_triton(query: torch.Tensor, row_pool: torch.Tensor, fmt: LowBitFormat,
                             block_tables: torch.Tensor, lengths: torch.Tensor,
                             key_scales: torch.Tensor, request_slots: torch.Tensor,
                             query_start_loc: torch.Tensor, scale: float,
                             max_query_len: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `tier_attention`, for LowBitFormat rows."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_q_heads, head_dim, device=query.device)
    lse = torch.full((num_tokens, num_q_heads), float("-inf"), device=query.device)
    if num_tokens == 0 or len(request_slots) == 0:
        return out, lse
    if max_query_len is None:
        # Sizing the grid needs the longest chunk on the host (a sync when on a GPU).
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_q = 1 if max_query_len == 1 else max(1, PREFILL_ROWS // group)
    rows = max(MIN_ROWS, triton.next_power_of_2(block_q * group))
    query = query if query.stride(2) == 1 else query.contiguous()
    assert row_pool.stride(2) == 1 and block_tables.stride(2) == 1 and key_scales.stride(2) == 1
    grid = (len(request_slots), num_kv_heads, triton.cdiv(max_query_len, block_q))
    _low_bit_attention_kernel[grid](
        query, row_pool, block_tables, lengths, key_scales, request_slots, query_start_loc,
        out, lse, scale, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        row_pool.stride(0), row_pool.stride(1), block_tables.stride(0), block_tables.stride(1),
        lengths.stride(0), lengths.stride(1), key_scales.stride(0), key_scales.stride(1),
        fmt.value_offset, fmt.params_offset,
        GROUP=group, BLOCK_Q=block_q, ROWS=rows, SLOTS=row_pool.shape[1],
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), KEY_BITS=fmt.key_bits,
        VALUE_BITS=fmt.value_bits, PLANE_BYTES=fmt.plane_bytes)
    return out, lse
