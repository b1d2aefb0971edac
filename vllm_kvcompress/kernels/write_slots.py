"""Op: write K/V rows, token positions and initial scores into pool slots.

Used for new tokens (append) and as the scatter half of compaction. A flat slot id is
`head_block * block_size + offset`; the pools are one layer's:
  key_pool        [num_head_blocks, block_size, D]  any strides
  value_pool      [num_head_blocks, block_size, D]  any strides
  positions_pool  [num_head_blocks, block_size] int32
  scores_pool     [num_head_blocks, block_size] float32
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.dispatch import use_triton


def write_slots(key_pool: torch.Tensor, value_pool: torch.Tensor, positions_pool: torch.Tensor,
                scores_pool: torch.Tensor, slot_ids: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, positions: torch.Tensor,
                scores: torch.Tensor | None = None, impl: str | None = None) -> None:
    """Write M slots in place.

    slot_ids: [M] int64, distinct.  keys, values: [M, D] (cast to the pool's dtype).
    positions: [M] int.  scores: [M] float32, or None for zeros.
    """
    if slot_ids.numel() == 0:
        return
    if use_triton(key_pool, impl):
        from vllm_kvcompress.kernels.write_slots_triton import write_slots_triton

        write_slots_triton(key_pool, value_pool, positions_pool, scores_pool, slot_ids, keys,
                           values, positions, scores)
    else:
        write_slots_reference(key_pool, value_pool, positions_pool, scores_pool, slot_ids, keys,
                              values, positions, scores)


def write_slots_reference(key_pool, value_pool, positions_pool, scores_pool, slot_ids, keys,
                          values, positions, scores=None) -> None:
    """Torch version of `write_slots` (CPU path and test oracle)."""
    block_size = key_pool.shape[1]
    head_block, offset = slot_ids // block_size, slot_ids % block_size
    key_pool[head_block, offset] = keys.to(key_pool.dtype)
    value_pool[head_block, offset] = values.to(value_pool.dtype)
    positions_pool[head_block, offset] = positions.to(positions_pool.dtype)
    scores_pool[head_block, offset] = 0.0 if scores is None else scores.to(scores_pool.dtype)
