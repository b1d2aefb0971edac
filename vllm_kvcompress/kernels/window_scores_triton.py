"""Triton kernel for `window_attention_scores`.

One program per (stream, tile of ROWS query rows, rows = G x W flattened). Pass one runs
over the stream's keys for each row's softmax max and sum; pass two recomputes the
normalised probabilities and adds their column sums to the output (atomically: the row
tiles of a stream share its keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.triton_dot import dot_args

ROWS = 64
BLOCK_T = 32


@triton.jit
def _tile_logits(q, key_ptr, kpos_ptr, t0, n, length, q_pos, row_ok, dims, dim_ok,
                 key_s_stream, key_s_slot, kpos_s_stream, scale,
                 BLOCK_T: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Logits [ROWS, BLOCK_T] of keys t0.. with invisible pairs at -inf, and the key slots."""
    slots = t0 + tl.arange(0, BLOCK_T)
    slot_ok = slots < length
    keys = tl.load(key_ptr + n * key_s_stream + slots[:, None] * key_s_slot + dims[None, :],
                   mask=slot_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)
    k_pos = tl.load(kpos_ptr + n * kpos_s_stream + slots, mask=slot_ok, other=0)
    logits = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
    visible = row_ok[:, None] & slot_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
    return tl.where(visible, logits, float("-inf")), slots, slot_ok


@triton.jit
def _window_scores_kernel(q_ptr, key_ptr, len_ptr, kpos_ptr, qpos_ptr, out_ptr, scale,
                          num_rows, window, head_dim,
                          q_s_stream, q_s_head, q_s_row, key_s_stream, key_s_slot,
                          kpos_s_stream, qpos_s_stream, out_s_stream,
                          ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    head, w = rows // window, rows % window
    q_pos = tl.load(qpos_ptr + n * qpos_s_stream + w, mask=rows < num_rows, other=-1)
    row_ok = (rows < num_rows) & (q_pos >= 0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + n * q_s_stream + head[:, None] * q_s_head + w[:, None] * q_s_row
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(DOT_DTYPE)
    length = tl.load(len_ptr + n)

    row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([ROWS], dtype=tl.float32)
    for t0 in range(0, length, BLOCK_T):
        logits, _, _ = _tile_logits(q, key_ptr, kpos_ptr, t0, n, length, q_pos, row_ok, dims,
                                    dim_ok, key_s_stream, key_s_slot, kpos_s_stream, scale,
                                    BLOCK_T, DOT_DTYPE, PRECISION)
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe_max) \
            + tl.sum(tl.exp(logits - safe_max[:, None]), 1)
        row_max = new_max

    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    for t0 in range(0, length, BLOCK_T):
        logits, slots, slot_ok = _tile_logits(q, key_ptr, kpos_ptr, t0, n, length, q_pos,
                                              row_ok, dims, dim_ok, key_s_stream, key_s_slot,
                                              kpos_s_stream, scale, BLOCK_T, DOT_DTYPE,
                                              PRECISION)
        probs = tl.exp(logits - safe_max[:, None]) / safe_sum[:, None]
        tl.atomic_add(out_ptr + n * out_s_stream + slots, tl.sum(probs, 0), mask=slot_ok)


def window_attention_scores_triton(window_queries: torch.Tensor, keys: torch.Tensor,
                                   lengths: torch.Tensor, key_positions: torch.Tensor,
                                   query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as `window_attention_scores`."""
    num_streams, group, window, head_dim = window_queries.shape
    scores = torch.zeros(keys.shape[:2], dtype=torch.float32, device=keys.device)
    if num_streams == 0 or window == 0:
        return scores
    window_queries = window_queries if window_queries.stride(3) == 1 \
        else window_queries.contiguous()
    keys = keys if keys.stride(2) == 1 else keys.contiguous()
    key_positions, query_positions = key_positions.contiguous(), query_positions.contiguous()
    grid = (num_streams, triton.cdiv(group * window, ROWS))
    _window_scores_kernel[grid](
        window_queries, keys, lengths.contiguous(), key_positions, query_positions, scores,
        scale, group * window, window, head_dim,
        window_queries.stride(0), window_queries.stride(1), window_queries.stride(2),
        keys.stride(0), keys.stride(1), key_positions.stride(0), query_positions.stride(0),
        scores.stride(0), ROWS=ROWS, BLOCK_T=BLOCK_T,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        **dot_args(keys.dtype))
    return scores
