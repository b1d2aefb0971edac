"""Op: read (and merge) pool slots into a dense buffer: the gather half of compaction.

Compaction reads every surviving slot into a buffer first and only then scatters it to its
new place (`write_slots`), so no move can overwrite a slot another move still has to read.
Row j of the buffer is a copy of flat slot src[j], bit for bit. A merge then rewrites some
rows: row j with members k (its own slot included) becomes
    x_j = sum_k w_k x_k / sum_k w_k   for x = key and value (float32, cast back),
or sum_k w_k x_k without normalisation; with normalisation, a class whose weights sum to
0 keeps the copy. Its score becomes the plain sum of the members' scores; its position
stays the copy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.kernels.dispatch import use_triton


@dataclass
class SlotMerge:
    """Merges of G buffer rows, members grouped by row (CSR).

    rows:           [G] int64 buffer rows rewritten by a merge
    member_slots:   [K] int64 flat slot ids; row rows[g] merges
                    member_slots[offsets[g]:offsets[g + 1]] (its own slot included)
    member_weights: [K] float32
    offsets:        [G + 1] int64
    normalize:      divide by the class's weight sum
    """

    rows: torch.Tensor
    member_slots: torch.Tensor
    member_weights: torch.Tensor
    offsets: torch.Tensor
    normalize: bool = True


@dataclass
class GatheredSlots:
    """M gathered slots: keys, values [M, D] in the pool's dtype, positions [M] int32,
    scores [M] float32."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor


def gather_merge_slots(key_pool: torch.Tensor, value_pool: torch.Tensor,
                       positions_pool: torch.Tensor, scores_pool: torch.Tensor, src: torch.Tensor,
                       merge: SlotMerge | None = None, impl: str | None = None) -> GatheredSlots:
    """Gather M = len(src) slots of one layer's pools, then apply `merge` to its rows.

    key_pool, value_pool [num_head_blocks, block_size, D] any strides; positions_pool,
    scores_pool [num_head_blocks, block_size]; src [M] int64 flat slot ids.
    """
    pools = (key_pool, value_pool, positions_pool, scores_pool)
    if use_triton(key_pool, impl):
        from vllm_kvcompress.kernels.gather_merge_triton import gather_merge_slots_triton

        return gather_merge_slots_triton(*pools, src, merge)
    return gather_merge_slots_reference(*pools, src, merge)


def gather_merge_slots_reference(key_pool, value_pool, positions_pool, scores_pool, src,
                                 merge: SlotMerge | None = None) -> GatheredSlots:
    """Torch version of `gather_merge_slots`."""
    block_size = key_pool.shape[1]
    head_block, offset = src // block_size, src % block_size
    gathered = GatheredSlots(key_pool[head_block, offset], value_pool[head_block, offset],
                             positions_pool[head_block, offset], scores_pool[head_block, offset])
    if merge is None or len(merge.rows) == 0:
        return gathered

    m_block, m_offset = merge.member_slots // block_size, merge.member_slots % block_size
    num_rows = len(merge.rows)
    row_of_member = torch.repeat_interleave(
        torch.arange(num_rows, device=src.device), merge.offsets[1:] - merge.offsets[:-1],
        output_size=len(merge.member_slots))
    weights = merge.member_weights.float()
    weight_sum = torch.zeros(num_rows, device=src.device).index_add_(0, row_of_member, weights)

    def merged(members: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(copies.shape, device=src.device)
        total.index_add_(0, row_of_member, weights[:, None] * members.float())
        if merge.normalize:
            has_weight = weight_sum[:, None] > 0
            divisor = torch.where(has_weight, weight_sum[:, None], 1.0)
            total = torch.where(has_weight, total / divisor, copies.float())
        return total.to(copies.dtype)

    gathered.keys[merge.rows] = merged(key_pool[m_block, m_offset], gathered.keys[merge.rows])
    gathered.values[merge.rows] = merged(value_pool[m_block, m_offset],
                                         gathered.values[merge.rows])
    gathered.scores[merge.rows] = torch.zeros(num_rows, device=src.device).index_add_(
        0, row_of_member, scores_pool[m_block, m_offset])
    return gathered
