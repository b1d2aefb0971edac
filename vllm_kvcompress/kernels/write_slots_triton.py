"""Triton kernel for `write_slots`: one program writes BLOCK_M slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16


@triton.jit
def _write_slots_kernel(k_pool_ptr, v_pool_ptr, pos_pool_ptr, score_pool_ptr, slot_ptr, key_ptr,
                        value_ptr, pos_ptr, score_ptr, num_slots, head_dim,
                        k_s_block, k_s_slot, k_s_dim, v_s_block, v_s_slot, v_s_dim,
                        pool_s_block, pool_s_slot, key_s_row, value_s_row,
                        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, HAS_SCORES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_slots
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    head_block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    both = row_ok[:, None] & (dims[None, :] < head_dim)
    keys = tl.load(key_ptr + rows[:, None].to(tl.int64) * key_s_row + dims[None, :], mask=both)
    values = tl.load(value_ptr + rows[:, None].to(tl.int64) * value_s_row + dims[None, :],
                     mask=both)
    key_dest = (k_pool_ptr + (head_block * k_s_block + offset * k_s_slot)[:, None]
                + dims[None, :] * k_s_dim)
    value_dest = (v_pool_ptr + (head_block * v_s_block + offset * v_s_slot)[:, None]
                  + dims[None, :] * v_s_dim)
    tl.store(key_dest, keys.to(k_pool_ptr.dtype.element_ty), mask=both)
    tl.store(value_dest, values.to(v_pool_ptr.dtype.element_ty), mask=both)
    meta = head_block * pool_s_block + offset * pool_s_slot
    tl.store(pos_pool_ptr + meta, tl.load(pos_ptr + rows, mask=row_ok).to(tl.int32), mask=row_ok)
    if HAS_SCORES:
        scores = tl.load(score_ptr + rows, mask=row_ok).to(tl.float32)
    else:
        scores = tl.zeros([BLOCK_M], dtype=tl.float32)
    tl.store(score_pool_ptr + meta, scores, mask=row_ok)


def write_slots_triton(key_pool: torch.Tensor, value_pool: torch.Tensor,
                       positions_pool: torch.Tensor, scores_pool: torch.Tensor,
                       slot_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       positions: torch.Tensor, scores: torch.Tensor | None) -> None:
    """Same contract as `write_slots`."""
    assert positions_pool.stride() == scores_pool.stride(), "metadata pools must share a layout"
    num_slots, head_dim = keys.shape
    keys = keys if keys.stride(1) == 1 else keys.contiguous()
    values = values if values.stride(1) == 1 else values.contiguous()
    grid = (triton.cdiv(num_slots, BLOCK_M),)
    _write_slots_kernel[grid](
        key_pool, value_pool, positions_pool, scores_pool, slot_ids, keys, values,
        positions.contiguous(), scores.contiguous() if scores is not None else scores_pool,
        num_slots, head_dim, *key_pool.stride(), *value_pool.stride(), *positions_pool.stride(),
        keys.stride(0), values.stride(0),
        BLOCK_SIZE=key_pool.shape[1], BLOCK_M=BLOCK_M,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_SCORES=scores is not None)
