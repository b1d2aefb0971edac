"""Triton kernels for `gather_merge_slots`: a plain gather (BLOCK_M slots per program),
then a merge (one merged row per program, looping over its members)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_kvcompress.kernels.gather_merge import GatheredSlots, SlotMerge

BLOCK_M = 16


@triton.jit
def _gather_kernel(k_pool_ptr, v_pool_ptr, pos_pool_ptr, score_pool_ptr, src_ptr, key_ptr,
                   value_ptr, pos_ptr, score_ptr, num_slots, head_dim,
                   k_s_block, k_s_slot, k_s_dim, v_s_block, v_s_slot, v_s_dim,
                   pool_s_block, pool_s_slot,
                   BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_slots
    dims = tl.arange(0, BLOCK_D)
    both = row_ok[:, None] & (dims[None, :] < head_dim)
    slot = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    head_block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    key_source = k_pool_ptr + (head_block * k_s_block + offset * k_s_slot)[:, None] \
        + dims[None, :] * k_s_dim
    value_source = v_pool_ptr + (head_block * v_s_block + offset * v_s_slot)[:, None] \
        + dims[None, :] * v_s_dim
    dest = rows.to(tl.int64)[:, None] * head_dim + dims[None, :]
    tl.store(key_ptr + dest, tl.load(key_source, mask=both), mask=both)
    tl.store(value_ptr + dest, tl.load(value_source, mask=both), mask=both)
    meta = head_block * pool_s_block + offset * pool_s_slot
    tl.store(pos_ptr + rows, tl.load(pos_pool_ptr + meta, mask=row_ok), mask=row_ok)
    tl.store(score_ptr + rows, tl.load(score_pool_ptr + meta, mask=row_ok), mask=row_ok)


@triton.jit
def _merge_kernel(k_pool_ptr, v_pool_ptr, score_pool_ptr, rows_ptr, member_ptr, weight_ptr,
                  offsets_ptr, key_ptr, value_ptr, score_ptr, head_dim,
                  k_s_block, k_s_slot, k_s_dim, v_s_block, v_s_slot, v_s_dim,
                  pool_s_block, pool_s_slot,
                  BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr):
    group = tl.program_id(0)
    row = tl.load(rows_ptr + group).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    key_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    value_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    weight_sum = 0.0
    score_sum = 0.0
    for k in range(tl.load(offsets_ptr + group), tl.load(offsets_ptr + group + 1)):
        slot = tl.load(member_ptr + k).to(tl.int64)
        head_block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        weight = tl.load(weight_ptr + k).to(tl.float32)
        key_source = k_pool_ptr + head_block * k_s_block + offset * k_s_slot + dims * k_s_dim
        value_source = v_pool_ptr + head_block * v_s_block + offset * v_s_slot + dims * v_s_dim
        key_sum += weight * tl.load(key_source, mask=dim_ok).to(tl.float32)
        value_sum += weight * tl.load(value_source, mask=dim_ok).to(tl.float32)
        weight_sum += weight
        score_sum += tl.load(score_pool_ptr + head_block * pool_s_block + offset * pool_s_slot)
    dest = row * head_dim + dims
    if NORMALIZE:
        # A class whose weights sum to zero keeps the gathered copy.
        if weight_sum > 0:
            tl.store(key_ptr + dest, (key_sum / weight_sum).to(key_ptr.dtype.element_ty),
                     mask=dim_ok)
            tl.store(value_ptr + dest, (value_sum / weight_sum).to(value_ptr.dtype.element_ty),
                     mask=dim_ok)
    else:
        tl.store(key_ptr + dest, key_sum.to(key_ptr.dtype.element_ty), mask=dim_ok)
        tl.store(value_ptr + dest, value_sum.to(value_ptr.dtype.element_ty), mask=dim_ok)
    tl.store(score_ptr + row, score_sum)


def gather_merge_slots_triton(key_pool: torch.Tensor, value_pool: torch.Tensor,
                              positions_pool: torch.Tensor, scores_pool: torch.Tensor,
                              src: torch.Tensor,
                              merge: SlotMerge | None) -> GatheredSlots:
    """Same contract as `gather_merge_slots`."""
    assert positions_pool.stride() == scores_pool.stride(), "metadata pools must share a layout"
    num_slots, head_dim = src.shape[0], key_pool.shape[2]
    device = key_pool.device
    gathered = GatheredSlots(
        keys=torch.empty(num_slots, head_dim, dtype=key_pool.dtype, device=device),
        values=torch.empty(num_slots, head_dim, dtype=value_pool.dtype, device=device),
        positions=torch.empty(num_slots, dtype=positions_pool.dtype, device=device),
        scores=torch.empty(num_slots, dtype=torch.float32, device=device))
    if num_slots == 0:
        return gathered
    common = dict(BLOCK_SIZE=key_pool.shape[1], BLOCK_D=triton.next_power_of_2(head_dim))
    pool_strides = (*key_pool.stride(), *value_pool.stride())
    _gather_kernel[(triton.cdiv(num_slots, BLOCK_M),)](
        key_pool, value_pool, positions_pool, scores_pool, src, gathered.keys, gathered.values,
        gathered.positions, gathered.scores, num_slots, head_dim, *pool_strides,
        *positions_pool.stride(), BLOCK_M=BLOCK_M, **common)
    if merge is not None and len(merge.rows):
        _merge_kernel[(len(merge.rows),)](
            key_pool, value_pool, scores_pool, merge.rows, merge.member_slots,
            merge.member_weights, merge.offsets, gathered.keys, gathered.values,
            gathered.scores, head_dim, *pool_strides, *scores_pool.stride(),
            NORMALIZE=merge.normalize, **common)
    return gathered
