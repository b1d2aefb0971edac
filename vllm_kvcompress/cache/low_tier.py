"""The low-bit tier's part of a compaction (MiKV): demoted tokens join it, quantized once.

The tier (second_tier.py, rows of kernels.low_bit.LowBitFormat) holds every token its
policy demoted, in token order, within the tier's cap. A row is written once, when its
token is demoted; compactions only move rows as bytes (so their codes, steps and minimums
never change) and drop the lowest-ranked ones past the cap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_kvcompress.cache.append import blocks_for
from vllm_kvcompress.cache.pools import LayerPools
from vllm_kvcompress.cache.second_tier import (TierLayer, TierView, TierWrites, frozen_scales,
                                               read_rows)
from vllm_kvcompress.cache.stream_tables import StreamTables
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies import apply
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

if TYPE_CHECKING:
    from vllm_kvcompress.cache.compaction import CompactionPlan


def survivor_ranks(tier: LowBitTier, ranks: torch.Tensor, candidates: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidate rows [N, A] the tier keeps (its cap, by rank), and each one's index
    among its stream's survivors in token order (by position): (survive [N, A] bool,
    index [N, A] int64, meaningless where not surviving)."""
    survive = tier.survivors(ranks, candidates)
    order = torch.where(survive, positions, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    index = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return survive, index


def low_tier_after(old: TierView, batch: StreamBatch, selection: Selection,
                   tier: LowBitTier, fmt: LowBitFormat, scales: torch.Tensor) -> TierView:
    """The padded definition of a low-bit tier after a compaction (the reference runner's,
    and the test oracle of the paged version): its rows `old` plus the slots of `batch`
    that `selection` demotes, quantized with the stream's key scales [N, D] (see
    frozen_scales), within the tier's cap, in token order."""
    demoted = apply.demoted(batch, selection)
    keys, values = fmt.round_trip(batch.keys[demoted], batch.values[demoted],
                                  scales[:, None, :].expand_as(batch.keys)[demoted])
    new_keys = torch.zeros(batch.keys.shape, device=keys.device).masked_scatter(demoted[..., None], keys)
    new_values = torch.zeros(batch.keys.shape, device=keys.device).masked_scatter(
        demoted[..., None], values)
    scores = (torch.zeros(demoted.shape, device=demoted.device) if selection.demote_scores is None
              else selection.demote_scores.float())
    candidates = torch.cat([old.positions >= 0, demoted], dim=1)
    positions = torch.cat([old.positions, batch.positions], dim=1)
    ranks = torch.cat([old.scores, torch.where(demoted, scores, 0.0)], dim=1)
    survive, index = survivor_ranks(tier, ranks, candidates, positions)
    lengths = survive.sum(dim=1)
    width = int(lengths.max()) if len(lengths) else 0
    # Scatter survivors to their index; the rest to a spare column cut off afterwards.
    column = torch.where(survive, index, width)

    def place(x: torch.Tensor, fill: float) -> torch.Tensor:
        shape = (x.shape[0], width + 1) + tuple(x.shape[2:])
        target = column if x.dim() == 2 else column[..., None].expand_as(x)
        return torch.full(shape, fill, dtype=x.dtype, device=x.device).scatter_(1, target, x)[:, :width]

    return TierView(keys=place(torch.cat([old.keys, new_keys], dim=1), 0.0),
                    values=place(torch.cat([old.values, new_values], dim=1), 0.0),
                    positions=place(torch.where(candidates, positions, -1), -1),
                    scores=place(ranks, 0.0), lengths=lengths)


def plan_low_tier(low: TierLayer, pools: LayerPools, tables: StreamTables, layer: int,
                  slots: torch.Tensor, selection: Selection, plan: CompactionPlan,
                  full_blocks: torch.Tensor) -> TierWrites:
    """Read everything the low tier keeps after this compaction (its surviving rows, and
    the slots `selection.demote` sends to it, encoded once here) before anything is
    written. full_blocks [R]: head-blocks of each request's new full tier, which come first."""
    num_heads = tables.num_kv_heads
    num_streams, max_len = plan.keep.shape
    old_ids, old_live, old_rows = read_rows(low, layer, slots)
    old_len = old_ids.shape[1]
    demoted = (torch.zeros_like(plan.keep) if selection.demote is None
               else plan.live & ~plan.keep & selection.demote)
    block_size = pools.keys.shape[1]
    new_src = plan.src_all                                                         # [N, T]
    new_positions = pools.positions[new_src // block_size, new_src % block_size].long()
    new_scores = (selection.demote_scores.float() if selection.demote_scores is not None
                  else torch.zeros(demoted.shape, device=demoted.device))
    scales = frozen_scales(low.tables.key_scales[layer, slots].reshape(num_streams, -1),
                           selection.key_scales)

    survive, index = survivor_ranks(
        low.tier, torch.cat([low.format.scores(old_rows), new_scores], dim=1),
        torch.cat([old_live, demoted], dim=1),
        torch.cat([low.format.positions(old_rows).long(), new_positions], dim=1))
    new_lengths = survive.sum(dim=1)
    per_block = low.slots_per_block
    blocks = blocks_for(new_lengths, per_block).view(-1, num_heads)                # [R, H]
    first = (full_blocks[:, None] + blocks.cumsum(dim=1) - blocks).view(-1)        # [N]
    stream_slot = slots.repeat_interleave(num_heads)
    dst = (tables.physical_blocks(stream_slot[:, None], first[:, None] + index // per_block)
           * per_block + index % per_block)

    kept_old = survive[:, :old_len].flatten().nonzero().squeeze(1)                 # host sync
    kept_new = survive[:, old_len:].flatten().nonzero().squeeze(1)                 # host sync
    src = new_src.flatten()[kept_new]
    encoded = low.format.encode(pools.keys[src // block_size, src % block_size],
                                pools.values[src // block_size, src % block_size],
                                new_positions.flatten()[kept_new], new_scores.flatten()[kept_new],
                                scales[kept_new // max_len])
    columns = torch.arange(-(-(old_len + max_len) // per_block), device=slots.device)
    new_rows = tables.physical_blocks(stream_slot[:, None], first[:, None] + columns)
    return TierWrites(
        rows=torch.cat([old_rows.reshape(-1, old_rows.shape[-1])[kept_old], encoded]),
        dst=torch.cat([dst[:, :old_len].flatten()[kept_old], dst[:, old_len:].flatten()[kept_new]]),
        new_lengths=new_lengths, blocks=blocks.sum(dim=1), new_rows=new_rows.int(),
        key_scales=scales)
