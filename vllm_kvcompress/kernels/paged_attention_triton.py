"""Triton kernel for `paged_attention`.

One program per (request, KV head, tile of BLOCK_Q queries). Its rows are the tile's
queries times the G query heads of the group, so each head-block of keys and values is
loaded once for the whole group (GQA). Online softmax over the stream's head-blocks, in
table order; with score emission a second pass recomputes the normalised probabilities
and adds their column sums to the slots' scores (atomically: tiles of one prefill chunk
share slots). A prior (out, lse) is the online softmax's starting state: max = lse,
sum = 1, accumulator = out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.triton_dot import dot_args

# Rows (queries x group heads) per program when the batch holds prefill chunks.
PREFILL_ROWS = 64
# tl.dot needs at least 16 rows (and 16 columns: head-blocks of >= 16 slots).
MIN_ROWS = 16


@triton.jit
def _block_logits(q, k_pool_ptr, table_row, b, dims, dim_ok, k_s_block, k_s_slot, k_s_dim,
                  scale, BLOCK_SIZE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Logits [ROWS, BLOCK_SIZE] of the rows against head-block b, and its id."""
    head_block = tl.load(table_row + b).to(tl.int64)
    keys = tl.load(k_pool_ptr + head_block * k_s_block
                   + tl.arange(0, BLOCK_SIZE)[:, None] * k_s_slot + dims[None, :] * k_s_dim,
                   mask=dim_ok[None, :], other=0.0).to(DOT_DTYPE)
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
    return logits, head_block


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, table_ptr, len_ptr, req_slot_ptr, qsl_ptr, out_ptr,
        score_ptr, prior_out_ptr, prior_lse_ptr, lse_ptr, scale, head_dim,
        q_s_tok, q_s_head, out_s_tok, out_s_head, po_s_tok, po_s_head, pl_s_tok, pl_s_head,
        lse_s_tok, lse_s_head,
        k_s_block, k_s_slot, k_s_dim, v_s_block, v_s_slot, v_s_dim,
        table_s_req, table_s_head, len_s_req, len_s_head, score_s_block, score_s_slot,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, EMIT: tl.constexpr,
        HAS_PRIOR: tl.constexpr, STORE_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr):
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
    row_pos = length - q_len + q_idx                      # stream index of the row's query
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * q_s_tok + q_head[:, None] * q_s_head
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(DOT_DTYPE)
    # The tile's last query bounds the keys it reads; empty tiles read none.
    tile_end = tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len)
    kv_end = tl.where(tile * BLOCK_Q < q_len, length - q_len + tile_end, 0)
    num_blocks = tl.cdiv(kv_end, BLOCK_SIZE)

    if HAS_PRIOR:
        row_max = tl.load(prior_lse_ptr + (q_start + q_idx) * pl_s_tok + q_head * pl_s_head,
                          mask=row_ok, other=float("-inf"))
        present = row_max > float("-inf")
        row_sum = tl.where(present, 1.0, 0.0)
        acc = tl.load(prior_out_ptr + (q_start + q_idx)[:, None] * po_s_tok
                      + q_head[:, None] * po_s_head + dims[None, :],
                      mask=row_ok[:, None] & dim_ok[None, :] & present[:, None], other=0.0)
    else:
        row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for b in range(0, num_blocks):
        logits, head_block = _block_logits(q, k_pool_ptr, table_row, b, dims, dim_ok, k_s_block,
                                           k_s_slot, k_s_dim, scale, BLOCK_SIZE, DOT_DTYPE,
                                           PRECISION)
        slots = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        allowed = row_ok[:, None] & (slots[None, :] <= row_pos[:, None])
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(logits - safe_max[:, None])
        rescale = tl.exp(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        # Unwritten slots may hold anything (NaN too): 0 * NaN would poison the sum.
        values = tl.load(v_pool_ptr + head_block * v_s_block
                         + tl.arange(0, BLOCK_SIZE)[:, None] * v_s_slot + dims[None, :] * v_s_dim,
                         mask=(slots < length)[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(DOT_DTYPE), values.to(DOT_DTYPE),
                                              input_precision=PRECISION)
        row_max = new_max

    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    tl.store(out_ptr + (q_start + q_idx)[:, None] * out_s_tok + q_head[:, None] * out_s_head
             + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    if STORE_LSE:
        lse = tl.where(row_sum > 0, row_max + tl.log(safe_sum), float("-inf"))
        tl.store(lse_ptr + (q_start + q_idx) * lse_s_tok + q_head * lse_s_head, lse, mask=row_ok)

    if EMIT:
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        for b in range(0, num_blocks):
            logits, head_block = _block_logits(q, k_pool_ptr, table_row, b, dims, dim_ok,
                                               k_s_block, k_s_slot, k_s_dim, scale,
                                               BLOCK_SIZE, DOT_DTYPE, PRECISION)
            slots = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            allowed = row_ok[:, None] & (slots[None, :] <= row_pos[:, None])
            probs = tl.where(allowed, tl.exp(logits - safe_max[:, None]) / safe_sum[:, None], 0.0)
            tl.atomic_add(score_ptr + head_block * score_s_block
                          + tl.arange(0, BLOCK_SIZE) * score_s_slot,
                          tl.sum(probs, 0), mask=slots < length)


def paged_attention_triton(query: torch.Tensor, key_pool: torch.Tensor,
                           value_pool: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, request_slots: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float,
                           scores_pool: torch.Tensor | None, max_query_len: int | None,
                           prior: tuple[torch.Tensor, torch.Tensor] | None = None,
                           lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `paged_attention`."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_requests = request_slots.shape[0]
    num_kv_heads = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    output = torch.zeros_like(query)
    if num_tokens == 0 or num_requests == 0:
        return output
    if max_query_len is None:
        # Sizing the grid needs the longest chunk on the host (a sync when on a GPU).
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_q = 1 if max_query_len == 1 else max(1, PREFILL_ROWS // group)
    rows = max(MIN_ROWS, triton.next_power_of_2(block_q * group))
    query = query if query.stride(2) == 1 else query.contiguous()
    assert block_tables.stride(2) == 1, "block table rows must be contiguous"
    block_size = key_pool.shape[1]
    if block_size < MIN_ROWS:
        raise ValueError(f"block_size={block_size}: the Triton kernel needs >= {MIN_ROWS}")
    emit = scores_pool is not None
    score_strides = scores_pool.stride() if emit else (0, 0)
    prior_out, prior_lse = prior if prior is not None else (output, output[..., 0])
    assert prior_out.stride(2) == 1, "prior rows must be contiguous"
    lse = lse_out if lse_out is not None else output[..., 0]
    grid = (num_requests, num_kv_heads, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        query, key_pool, value_pool, block_tables, lengths, request_slots, query_start_loc,
        output, scores_pool if emit else output, prior_out, prior_lse, lse, scale, head_dim,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        prior_out.stride(0), prior_out.stride(1), prior_lse.stride(0), prior_lse.stride(1),
        lse.stride(0), lse.stride(1),
        *key_pool.stride(), *value_pool.stride(), block_tables.stride(0), block_tables.stride(1),
        lengths.stride(0), lengths.stride(1), *score_strides,
        GROUP=group, BLOCK_Q=block_q, ROWS=rows, BLOCK_SIZE=block_size,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), EMIT=emit,
        HAS_PRIOR=prior is not None, STORE_LSE=lse_out is not None, **dot_args(key_pool.dtype))
    return output
