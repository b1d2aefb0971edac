"""Compaction: apply a policy's Selection to one layer's streams of some requests.

Survivors of stream n (its kept slots, in token order) become its first new_len[n] slots.
The H streams of a request are repacked from local head-block 0 in head order (head 0's
blocks, then head 1's, ...), so a request's live head-blocks always fill its first
ceil(used / H) pages and the pages after them can be released. Every survivor is read into
a buffer (merged there) before any destination is written (gather, then scatter), so
sources and destinations may overlap freely. The result equals policies.apply's
`apply_selection` on the gathered streams. Requests with a low-bit tier keep it in the
head-blocks after their full tier's: the slots a Selection demotes and the tier's
surviving rows are read with everything else and written there (low_tier.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.append import blocks_for
from vllm_kvcompress.cache.low_tier import plan_low_tier
from vllm_kvcompress.cache.pools import LayerPools
from vllm_kvcompress.cache.second_tier import TierLayer, write_tier
from vllm_kvcompress.cache.selection_rewrites import rewrite_survivors
from vllm_kvcompress.cache.stream_tables import StreamTables, stream_slot_ids
from vllm_kvcompress.kernels import SlotMerge, gather_merge_slots, write_slots
from vllm_kvcompress.policies.selection import Selection


@dataclass
class CompactionPlan:
    """Moves and new tables of one compaction. M = survivors, N = R * H streams, T = the
    selection's padded length.

    src, dst:     [M] int64 flat slot ids, survivors in stream-major, token order
    kept_flat:    [M] int64 index of each survivor in the flattened [N, T] selection
    survivor_of:  [N, T] int64 buffer row of each kept slot (meaningless elsewhere)
    src_all:      [N, T] int64 flat slot id of every live slot (0 elsewhere)
    live, keep:   [N, T] bool
    merge:        class merges, or None
    new_lengths:  [N] int64;  new_rows: [N, C] int32 new block-table prefix
    used_blocks:  [R] int64 local head-blocks taken after compaction
    longest:      the longest new length, on the host
    """

    src: torch.Tensor
    dst: torch.Tensor
    kept_flat: torch.Tensor
    survivor_of: torch.Tensor
    src_all: torch.Tensor
    live: torch.Tensor
    keep: torch.Tensor
    merge: SlotMerge | None
    new_lengths: torch.Tensor
    new_rows: torch.Tensor
    used_blocks: torch.Tensor
    longest: int


def compact_layer(pools: LayerPools, tables: StreamTables, layer: int, slots: torch.Tensor,
                  selection: Selection, impl: str | None = None,
                  low: TierLayer | None = None) -> int:
    """Apply `selection` (over the padded [R * H, T] layout of `gather`) to requests `slots`,
    whose low-bit tiers (if they have one) are `low`. Returns the longest stream after."""
    plan = plan_compaction(tables, layer, slots, selection, pools.keys.shape[1])
    survivors = gather_merge_slots(*pools, plan.src, plan.merge, impl)
    survivors = rewrite_survivors(survivors, pools, selection, plan)
    moves = None
    if low is not None:
        moves = plan_low_tier(low, pools, tables, layer, slots, selection, plan, plan.used_blocks)
        plan.used_blocks = plan.used_blocks + moves.blocks
        _check_capacity(tables, slots, plan.used_blocks)
    write_slots(*pools, plan.dst, survivors.keys, survivors.values, survivors.positions,
                survivors.scores, impl)
    if moves is not None:
        write_tier(low, layer, slots, moves)
    _commit_tables(tables, layer, slots, plan)
    return plan.longest


def plan_compaction(tables: StreamTables, layer: int, slots: torch.Tensor,
                    selection: Selection, block_size: int) -> CompactionPlan:
    num_heads = tables.num_kv_heads
    num_streams, max_len = selection.keep.shape
    stream_slot = slots.repeat_interleave(num_heads)                            # [N]
    old_rows = tables.block_tables[layer, slots].reshape(num_streams, -1)
    src_all, live = stream_slot_ids(old_rows, tables.lengths[layer, slots].reshape(-1),
                                    block_size, max_len)                       # [N, T]
    keep = selection.keep & live

    new_lengths = keep.sum(dim=1)
    new_blocks = blocks_for(new_lengths, block_size).view(-1, num_heads)       # [R, H]
    first_block = (new_blocks.cumsum(dim=1) - new_blocks).view(-1)             # [N]
    rank = keep.cumsum(dim=1) - 1                                              # [N, T]
    dst_local = first_block[:, None] + rank.clamp(min=0) // block_size
    dst_all = (tables.physical_blocks(stream_slot[:, None], dst_local) * block_size
               + rank % block_size)

    # One read from the device per compaction: the survivor count sizes the move list and
    # the longest new stream bounds the next gather (two numbers packed in one integer).
    packed = int(new_lengths.sum() * (max_len + 1) + new_lengths.max()) if num_streams else 0
    num_survivors, longest = divmod(packed, max_len + 1)
    kept_flat = keep.flatten().nonzero_static(size=num_survivors).squeeze(1)
    survivor_of = (keep.flatten().cumsum(0) - 1).view(keep.shape)
    columns = torch.arange(min(-(-max_len // block_size), tables.max_blocks_per_stream),
                           device=slots.device)
    new_rows = tables.physical_blocks(stream_slot[:, None], first_block[:, None] + columns)
    return CompactionPlan(
        src=src_all.flatten()[kept_flat], dst=dst_all.flatten()[kept_flat],
        kept_flat=kept_flat, survivor_of=survivor_of, src_all=src_all, live=live, keep=keep,
        merge=_class_merges(selection, keep, live, src_all, survivor_of),
        new_lengths=new_lengths, new_rows=new_rows.int(), used_blocks=new_blocks.sum(dim=1),
        longest=longest)


def _class_merges(selection: Selection, keep: torch.Tensor, live: torch.Tensor,
                  src_all: torch.Tensor, survivor_of: torch.Tensor) -> SlotMerge | None:
    """The survivors that have members, with their classes (centre included) in slot
    order; None for pure eviction. Members naming a slot that is not kept are dropped."""
    if selection.merge_into is None:
        return None
    max_len = keep.shape[1]
    own = torch.arange(max_len, device=keep.device)[None, :]
    target = torch.where(keep, own, selection.merge_into)
    in_range = (target >= 0) & (target < max_len)
    target = target.clamp(0, max_len - 1)
    valid = live & in_range & keep.gather(1, target)
    has_members = _has_members(valid & ~keep, target)
    in_class = valid & has_members.gather(1, target)
    members = in_class.flatten().nonzero().squeeze(1)                          # host sync
    row = survivor_of.gather(1, target).flatten()[members]
    order = row.argsort(stable=True)
    rows, counts = torch.unique_consecutive(row[order], return_counts=True)
    weights = (torch.ones(keep.shape, device=keep.device) if selection.weights is None
               else selection.weights.float())
    return SlotMerge(rows=rows, member_slots=src_all.flatten()[members][order],
                     member_weights=weights.flatten()[members][order],
                     offsets=torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                     normalize=selection.normalize_merges)


def _has_members(member: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: kept slots that some member (non-kept valid slot) merges into."""
    counts = torch.zeros(member.shape, dtype=torch.int64, device=member.device)
    return counts.scatter_add_(1, target, member.long()) > 0


def _check_capacity(tables: StreamTables, slots: torch.Tensor, used_blocks: torch.Tensor) -> None:
    """Refuse (before writing anything) a compaction whose tiers outgrow the requests'
    pages: the low tier can grow while the full tier shrinks."""
    capacity = tables.page_counts[slots].long() * tables.num_kv_heads
    if bool((used_blocks > capacity).any()):                                   # host sync
        r = int((used_blocks > capacity).nonzero()[0])
        raise RuntimeError(f"request slot {int(slots[r])} needs {int(used_blocks[r])} "
                           f"head-blocks after compaction but its pages hold {int(capacity[r])}")


def _commit_tables(tables: StreamTables, layer: int, slots: torch.Tensor,
                   plan: CompactionPlan) -> None:
    num_heads = tables.num_kv_heads
    columns = plan.new_rows.shape[1]
    tables.block_tables[layer, slots, :, :columns] = plan.new_rows.view(len(slots), num_heads,
                                                                        columns)
    tables.lengths[layer, slots] = plan.new_lengths.view(-1, num_heads).int()
    tables.used_blocks[layer, slots] = plan.used_blocks.int()
