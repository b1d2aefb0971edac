"""The low-bit tier of every stream: packed rows in head-blocks of the request's own pages.

A stream keeps its tokens in two tiers: the full tier (pools.py: K/V in the model's dtype,
block_size slots per head-block) and, for policies that demote instead of evicting
(policies.selection.LowBitTier), the low-bit tier: rows of kernels.low_bit.LowBitFormat,
P = format.slots_per_block(cell_bytes) of them per head-block, in token order. A row is
written once, when its token is demoted; compaction only moves rows as bytes.

Both tiers take head-blocks from the request's pages. After a compaction a request's
local head-blocks 0 .. F - 1 hold its full tier (heads in order) and F .. F + Lo - 1 its
low tier (heads in order), so its live head-blocks still fill its first pages and appends
(full tier only) continue at the bump pointer.

Tables, indexed like StreamTables by request slot:
  block_tables [L, S, H, max_blocks] int32  physical head-blocks of each stream's low tier
  lengths      [L, S, H] int32              rows per stream
  key_balance  [L, S, H, D] float32         outlier balancing its keys were stored with
                                            (fixed at the first compression; 0 = not yet)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_kvcompress.cache.append import blocks_for
from vllm_kvcompress.cache.pools import LayerPools
from vllm_kvcompress.cache.stream_tables import StreamTables, stream_slot_ids
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies import apply
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

if TYPE_CHECKING:
    from vllm_kvcompress.cache.compaction import CompactionPlan


@dataclass
class LowTierTables:
    block_tables: torch.Tensor
    lengths: torch.Tensor
    key_balance: torch.Tensor

    @classmethod
    def create(cls, num_layers: int, num_kv_heads: int, max_requests: int, max_blocks: int,
               head_size: int, device: torch.device | str) -> LowTierTables:
        shape = (num_layers, max_requests, num_kv_heads)
        return cls(block_tables=torch.zeros(*shape, max_blocks, dtype=torch.int32, device=device),
                   lengths=torch.zeros(shape, dtype=torch.int32, device=device),
                   key_balance=torch.zeros(*shape, head_size, device=device))

    def reset(self, slots: torch.Tensor) -> None:
        self.lengths[:, slots] = 0
        self.key_balance[:, slots] = 0.0


@dataclass
class LowTierLayer:
    """One layer's low tier in one format: rows [num_head_blocks, P, row_bytes] uint8 (a
    view of the layer's KV memory) and the tables."""

    tier: LowBitTier
    format: LowBitFormat
    rows: torch.Tensor
    tables: LowTierTables

    @property
    def slots_per_block(self) -> int:
        return self.rows.shape[1]


@dataclass
class LowTierView:
    """One layer's low tiers of R requests, padded to A rows (N = R * H): keys, values
    [N, A, D] float32 as attention reads them; positions [N, A] int64 (-1 in padding);
    scores [N, A] float32 (ranks); lengths [N] int64."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def read_rows(low: LowTierLayer, layer: int, slots: torch.Tensor,
              max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat row ids [N, A], live [N, A], rows [N, A, row_bytes]) of requests `slots`' low
    tiers in `layer`; A = max_len or the longest tier (a host sync)."""
    num_streams = len(slots) * low.tables.lengths.shape[2]
    lengths = low.tables.lengths[layer, slots].reshape(-1).long()
    if max_len is None:
        max_len = int(lengths.max()) if num_streams else 0
    table = low.tables.block_tables[layer, slots].reshape(num_streams, -1)
    ids, live = stream_slot_ids(table, lengths, low.slots_per_block, max_len)
    slots_per_block = low.slots_per_block
    return ids, live, low.rows[ids // slots_per_block, ids % slots_per_block]


def view_low_tier(low: LowTierLayer, layer: int, slots: torch.Tensor) -> LowTierView:
    _, live, rows = read_rows(low, layer, slots)
    balance = low.tables.key_balance[layer, slots].reshape(-1, 1, low.format.head_size)
    keys, values = low.format.decode(rows, torch.where(balance > 0, balance, 1.0))
    return LowTierView(
        keys=torch.where(live[..., None], keys, 0.0), values=torch.where(live[..., None], values, 0.0),
        positions=torch.where(live, low.format.positions(rows).long(), -1),
        scores=torch.where(live, low.format.scores(rows), 0.0),
        lengths=low.tables.lengths[layer, slots].reshape(-1).long())


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


def frozen_balance(stored: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """[N, D] the balancing a stream's rows are stored with: what it has (stored, zeros =
    none yet), else the selection's (None = 1)."""
    fresh = torch.ones_like(stored) if given is None else given.float()
    return torch.where((stored > 0).all(dim=1, keepdim=True), stored, fresh)


def low_tier_after(old: LowTierView, batch: StreamBatch, selection: Selection,
                   tier: LowBitTier, fmt: LowBitFormat, balance: torch.Tensor) -> LowTierView:
    """The padded definition of a low-bit tier after a compaction (the reference runner's,
    and the test oracle of the paged version): its rows `old` plus the slots of `batch`
    that `selection` demotes, quantized with the stream's balancing [N, D] (see
    frozen_balance), within the tier's cap, in token order."""
    demoted = apply.demoted(batch, selection)
    keys, values = fmt.round_trip(batch.keys[demoted], batch.values[demoted],
                                  balance[:, None, :].expand_as(batch.keys)[demoted])
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

    return LowTierView(keys=place(torch.cat([old.keys, new_keys], dim=1), 0.0),
                       values=place(torch.cat([old.values, new_values], dim=1), 0.0),
                       positions=place(torch.where(candidates, positions, -1), -1),
                       scores=place(ranks, 0.0), lengths=lengths)


@dataclass
class LowTierMoves:
    """The low tier's part of one compaction: rows [M, row_bytes] to write at flat row ids
    dst [M], the new lengths [N], the head-blocks each request's low tier takes [R], the
    new block-table prefixes [N, C] and the streams' balancing [N, D]."""

    rows: torch.Tensor
    dst: torch.Tensor
    new_lengths: torch.Tensor
    blocks: torch.Tensor
    new_rows: torch.Tensor
    key_balance: torch.Tensor


def plan_low_tier(low: LowTierLayer, pools: LayerPools, tables: StreamTables, layer: int,
                  slots: torch.Tensor, selection: Selection, plan: CompactionPlan,
                  full_blocks: torch.Tensor) -> LowTierMoves:
    """Read everything the low tier keeps after this compaction (its surviving rows, and
    the slots `selection.demote` sends to it, encoded once here) before anything is
    written. full_blocks [R]: head-blocks of each request's new full tier, which come first."""
    num_heads = tables.num_kv_heads
    num_streams, max_len = plan.keep.shape
    old_ids, old_live, old_rows = read_rows(low, layer, slots)
    old_len = old_ids.shape[1]
    demoted = plan.live & ~plan.keep
    demoted = demoted & selection.demote if selection.demote is not None else demoted & False
    block_size = pools.keys.shape[1]
    new_src = plan.src_all                                                         # [N, T]
    new_positions = pools.positions[new_src // block_size, new_src % block_size].long()
    new_scores = (selection.demote_scores.float() if selection.demote_scores is not None
                  else torch.zeros(demoted.shape, device=demoted.device))
    balance = frozen_balance(low.tables.key_balance[layer, slots].reshape(num_streams, -1),
                             selection.key_balance)

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
                                balance[kept_new // max_len])
    columns = torch.arange(-(-(old_len + max_len) // per_block), device=slots.device)
    new_rows = tables.physical_blocks(stream_slot[:, None], first[:, None] + columns)
    return LowTierMoves(
        rows=torch.cat([old_rows.reshape(-1, old_rows.shape[-1])[kept_old], encoded]),
        dst=torch.cat([dst[:, :old_len].flatten()[kept_old], dst[:, old_len:].flatten()[kept_new]]),
        new_lengths=new_lengths, blocks=blocks.sum(dim=1), new_rows=new_rows.int(),
        key_balance=balance)


def apply_low_tier(low: LowTierLayer, layer: int, slots: torch.Tensor, moves: LowTierMoves) -> None:
    """Write the moved and new rows, then the tables (after the full tier's writes)."""
    per_block = low.slots_per_block
    low.rows[moves.dst // per_block, moves.dst % per_block] = moves.rows
    heads = low.tables.lengths.shape[2]
    columns = min(moves.new_rows.shape[1], low.tables.block_tables.shape[3])
    low.tables.block_tables[layer, slots, :, :columns] = moves.new_rows[:, :columns].view(
        len(slots), heads, columns)
    low.tables.lengths[layer, slots] = moves.new_lengths.view(-1, heads).int()
    low.tables.key_balance[layer, slots] = moves.key_balance.view(len(slots), heads, -1)
