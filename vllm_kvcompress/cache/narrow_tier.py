"""The narrow-key tier (ThinK): kept tokens whose keys lost their pruned channels.

Unlike the low-bit tier, the narrow tier is part of what a policy chooses from: a stream's
narrow tokens are the first of its tokens (those narrowed at its first compression, older
than the ones it kept whole), so a policy sees the stream as its narrow rows, read back
with zeros in the pruned channels, followed by its full tier (`gather_streams`). Its
streams are short (within the budget), so a compaction reads them whole, applies the
Selection the padded way (policies.apply) and writes every survivor back to its tier:
narrow ones (old, or narrowed now) as rows, the rest to the full tier.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vllm_kvcompress.cache.append import blocks_for
from vllm_kvcompress.cache.pools import LayerPools
from vllm_kvcompress.cache.second_tier import (TierLayer, TierWrites, frozen_scales, view_tier,
                                               write_tier)
from vllm_kvcompress.cache.stream_tables import StreamTables, stream_slot_ids
from vllm_kvcompress.kernels import write_slots
from vllm_kvcompress.policies import apply_selection
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch


def gather_streams(pools: LayerPools, tier: TierLayer, tables: StreamTables, layer: int,
                   slots: torch.Tensor, width: int | None = None
                   ) -> tuple[StreamBatch, torch.Tensor]:
    """The streams of requests `slots` as policies see them: narrow rows, then the full
    tier, padded to `width` (default: the longest, read from the device; a StreamBatch
    with only the stream fields set: H, layer and scale are placeholders), and each
    stream's narrow row count [N]."""
    narrow = view_tier(tier, layer, slots)
    num_streams = len(narrow.lengths)
    full_lengths = tables.lengths[layer, slots].reshape(-1).long()
    lengths = narrow.lengths + full_lengths
    if width is None:
        width = int(lengths.max()) if num_streams else 0                       # host sync
    block_size = pools.keys.shape[1]
    table = tables.block_tables[layer, slots].reshape(num_streams, -1)
    column = torch.arange(width, device=slots.device)[None, :]
    from_full = (column - narrow.lengths[:, None]).clamp(min=0)
    ids, _ = stream_slot_ids(table, full_lengths, block_size, width)
    full_ids = ids.gather(1, from_full)
    in_narrow = column < narrow.lengths[:, None]
    live = column < lengths[:, None]
    narrow_column = column.clamp(max=max(narrow.positions.shape[1] - 1, 0)).expand(num_streams, -1)

    def pick(narrow_part: torch.Tensor, full_part: torch.Tensor, fill) -> torch.Tensor:
        if narrow_part.shape[1]:
            index = narrow_column if narrow_part.dim() == 2 else \
                narrow_column[..., None].expand(-1, -1, narrow_part.shape[-1])
            taken = narrow_part.gather(1, index).to(full_part.dtype)
            mask = in_narrow if full_part.dim() == 2 else in_narrow[..., None]
            full_part = torch.where(mask, taken, full_part)
        mask = live if full_part.dim() == 2 else live[..., None]
        return torch.where(mask, full_part, fill)

    head_block, offset = full_ids // block_size, full_ids % block_size
    batch = StreamBatch(
        keys=pick(narrow.keys, pools.keys[head_block, offset], 0.0),
        values=pick(narrow.values, pools.values[head_block, offset], 0.0),
        lengths=lengths,
        positions=pick(narrow.positions, pools.positions[head_block, offset].long(), -1),
        acc_scores=pick(narrow.scores, pools.scores[head_block, offset], 0.0),
        num_kv_heads=tables.num_kv_heads, layer=layer, num_layers=0, scale=1.0)
    return batch, narrow.lengths


def settle_narrowing(selection: Selection, stored_scales: torch.Tensor,
                     narrow_lengths: torch.Tensor) -> tuple[Selection, torch.Tensor]:
    """The selection as a narrow tier applies it, and the key scales each stream keeps
    [N, D]. A stream whose scales are fixed (stored_scales [N, D] not all 0) keeps its
    first narrow_lengths [N] slots narrow and narrows nothing more; the others narrow
    what the selection asks, and fix its scales if that is anything."""
    fixed = (stored_scales != 0).any(dim=1)
    scales = frozen_scales(stored_scales, selection.key_scales)
    column = torch.arange(selection.keep.shape[1], device=selection.keep.device)[None, :]
    asked = selection.narrow if selection.narrow is not None else torch.zeros_like(selection.keep)
    narrow = torch.where(fixed[:, None], column < narrow_lengths[:, None], asked) & selection.keep
    settled = replace(selection, narrow=narrow, key_scales=scales)
    return settled, torch.where((fixed | narrow.any(dim=1))[:, None], scales, 0.0)


def compact_narrow(pools: LayerPools, tier: TierLayer, tables: StreamTables, layer: int,
                   slots: torch.Tensor, selection: Selection, impl: str | None = None) -> None:
    """Apply `selection` (over gather_streams' layout, or the full tier's padded to the
    host's bound when the requests narrow for the first time) to requests `slots` with a
    narrow tier: survivors in token order, the narrow ones first, each written to its
    tier."""
    batch, narrow_lengths = gather_streams(pools, tier, tables, layer, slots,
                                           width=selection.keep.shape[1])
    stored = tier.tables.key_scales[layer, slots].reshape(len(narrow_lengths), -1)
    selection, key_scales = settle_narrowing(selection, stored, narrow_lengths)
    narrow = selection.narrow
    out = apply_selection(batch, selection)
    # Survivors keep their order: the narrow ones must come first.
    keep = selection.keep & batch.live_mask()
    survivors = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :out.max_len]
    rank = torch.arange(out.max_len, device=slots.device)[None, :]
    survivor_narrow = narrow.gather(1, survivors) & (rank < out.lengths[:, None])
    new_narrow = survivor_narrow.sum(dim=1)
    if bool((survivor_narrow != (rank < new_narrow[:, None])).any()):          # host sync
        raise ValueError("narrowed slots must come before the whole ones a stream keeps")
    _write_back(pools, tier, tables, layer, slots, out, new_narrow, key_scales, impl)


def _write_back(pools: LayerPools, tier: TierLayer, tables: StreamTables, layer: int,
                slots: torch.Tensor, out: StreamBatch, new_narrow: torch.Tensor,
                key_scales: torch.Tensor, impl: str | None) -> None:
    """Survivors [N, T'] (the first new_narrow [N] narrow) to the full tier's first
    head-blocks and the narrow tier's after them; then the tables."""
    num_heads, block_size = tables.num_kv_heads, pools.keys.shape[1]
    per_block = tier.slots_per_block
    full_lengths = out.lengths - new_narrow
    full_blocks = blocks_for(full_lengths, block_size).view(-1, num_heads)
    narrow_blocks = blocks_for(new_narrow, per_block).view(-1, num_heads)
    full_first = (full_blocks.cumsum(dim=1) - full_blocks).view(-1)
    narrow_first = (full_blocks.sum(dim=1, keepdim=True) + narrow_blocks.cumsum(dim=1)
                    - narrow_blocks).view(-1)
    used = full_blocks.sum(dim=1) + narrow_blocks.sum(dim=1)
    capacity = tables.page_counts[slots].long() * num_heads
    if bool((used > capacity).any()):                                          # host sync
        raise RuntimeError(f"requests {slots.tolist()} need {used.tolist()} head-blocks after "
                           f"compaction but their pages hold {capacity.tolist()}")
    stream_slot = slots.repeat_interleave(num_heads)[:, None]
    rank = torch.arange(out.max_len, device=slots.device)[None, :]
    is_narrow = rank < new_narrow[:, None]
    is_full = ~is_narrow & (rank < out.lengths[:, None])
    full_rank = (rank - new_narrow[:, None]).clamp(min=0)
    full_dst = (tables.physical_blocks(stream_slot, full_first[:, None] + full_rank // block_size)
                * block_size + full_rank % block_size)
    narrow_dst = (tables.physical_blocks(stream_slot, narrow_first[:, None] + rank // per_block)
                  * per_block + rank % per_block)
    full = is_full.flatten().nonzero().squeeze(1)                              # host sync
    narrow = is_narrow.flatten().nonzero().squeeze(1)                          # host sync
    head_size = out.keys.shape[-1]
    keys, values = out.keys.reshape(-1, head_size), out.values.reshape(-1, head_size)
    positions, scores = out.positions.reshape(-1), out.acc_scores.reshape(-1)
    stream = narrow // out.max_len
    rows = tier.format.encode(keys[narrow], values[narrow], positions[narrow], scores[narrow],
                              key_scales[stream])
    write_slots(*pools, full_dst.flatten()[full], keys[full], values[full], positions[full],
                scores[full], impl)
    columns = torch.arange(-(-out.max_len // min(block_size, per_block)) + 1, device=slots.device)
    full_rows = tables.physical_blocks(stream_slot, full_first[:, None] + columns)
    write_tier(tier, layer, slots, TierWrites(
        rows=rows, dst=narrow_dst.flatten()[narrow], new_lengths=new_narrow,
        blocks=narrow_blocks.sum(dim=1),
        new_rows=tables.physical_blocks(stream_slot, narrow_first[:, None] + columns).int(),
        key_scales=key_scales))
    width = min(full_rows.shape[1], tables.block_tables.shape[3])
    tables.block_tables[layer, slots, :, :width] = full_rows[:, :width].int().view(
        len(slots), num_heads, width)
    tables.lengths[layer, slots] = full_lengths.view(-1, num_heads).int()
    tables.used_blocks[layer, slots] = used.int()

