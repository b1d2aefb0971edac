"""A stream's second tier: its tokens stored in rows smaller than a full token.

A stream keeps its tokens in the full tier (pools.py: K/V in the model's dtype, block_size
slots per head-block) and, for policies that ask for one (policies.selection), a second
tier of rows in a compact format, P of them per head-block (the same memory read as rows):
- LowBitTier -> kernels.low_bit.LowBitFormat: tokens the policy does not keep at full
  precision, quantized once (MiKV; low_tier.py moves them);
- NarrowKeyTier -> kernels.narrow_key.NarrowKeyFormat: kept tokens whose keys lost their
  pruned channels (ThinK; narrow_tier.py).
Both tiers take head-blocks from the request's pages. After a compaction a request's local
head-blocks 0 .. F - 1 hold its full tier (heads in order) and F .. F + S - 1 its second
tier (heads in order), so its live head-blocks fill its first pages and appends (full tier
only) continue at the bump pointer. A second tier is in token order, like the full tier.

Tables, indexed like StreamTables by request slot:
  block_tables [L, S, H, max_blocks] int32  physical head-blocks of each stream's second tier
  lengths      [L, S, H] int32              rows per stream
  key_scales   [L, S, H, D] float32         how its keys are stored (selection.key_scales),
                                            fixed by its first compaction; 0 = not yet
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.stream_tables import stream_slot_ids
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.kernels.narrow_key import NarrowKeyFormat
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier, SecondTier

RowFormat = LowBitFormat | NarrowKeyFormat


def row_format(tier: SecondTier, head_size: int, dtype: torch.dtype) -> RowFormat:
    """The rows a second tier is stored in, for keys and values of head_size and dtype."""
    if isinstance(tier, LowBitTier):
        return LowBitFormat(head_size, tier.key_bits, tier.value_bits)
    if isinstance(tier, NarrowKeyTier):
        return NarrowKeyFormat(head_size, tier.kept_channels(head_size), dtype)
    raise TypeError(f"not a second tier: {tier!r}")


@dataclass
class TierTables:
    block_tables: torch.Tensor
    lengths: torch.Tensor
    key_scales: torch.Tensor

    @classmethod
    def create(cls, num_layers: int, num_kv_heads: int, max_requests: int, max_blocks: int,
               head_size: int, device: torch.device | str) -> TierTables:
        shape = (num_layers, max_requests, num_kv_heads)
        return cls(block_tables=torch.zeros(*shape, max_blocks, dtype=torch.int32, device=device),
                   lengths=torch.zeros(shape, dtype=torch.int32, device=device),
                   key_scales=torch.zeros(*shape, head_size, device=device))

    def reset(self, slots: torch.Tensor) -> None:
        self.lengths[:, slots] = 0
        self.key_scales[:, slots] = 0.0


@dataclass
class TierLayer:
    """One layer's second tiers in one format: rows [num_head_blocks, P, row_bytes] uint8
    (a view of the layer's KV memory) and the tables."""

    tier: SecondTier
    format: RowFormat
    rows: torch.Tensor
    tables: TierTables

    @property
    def slots_per_block(self) -> int:
        return self.rows.shape[1]


@dataclass
class TierView:
    """One layer's second tiers of R requests, padded to A rows (N = R * H): keys, values
    [N, A, D] float32 as attention reads them; positions [N, A] int64 (-1 in padding);
    scores [N, A] float32; lengths [N] int64."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def empty(cls, num_streams: int, head_size: int) -> TierView:
        return cls(torch.zeros(num_streams, 0, head_size), torch.zeros(num_streams, 0, head_size),
                   torch.zeros(num_streams, 0, dtype=torch.long), torch.zeros(num_streams, 0),
                   torch.zeros(num_streams, dtype=torch.long))


def read_rows(tier: TierLayer, layer: int, slots: torch.Tensor,
              max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat row ids [N, A], live [N, A], rows [N, A, row_bytes]) of requests `slots`'
    second tiers in `layer`; A = max_len or the longest tier (a host sync)."""
    num_streams = len(slots) * tier.tables.lengths.shape[2]
    lengths = tier.tables.lengths[layer, slots].reshape(-1).long()
    if max_len is None:
        max_len = int(lengths.max()) if num_streams else 0
    table = tier.tables.block_tables[layer, slots].reshape(num_streams, -1)
    ids, live = stream_slot_ids(table, lengths, tier.slots_per_block, max_len)
    per_block = tier.slots_per_block
    return ids, live, tier.rows[ids // per_block, ids % per_block]


def view_tier(tier: TierLayer, layer: int, slots: torch.Tensor,
              max_len: int | None = None) -> TierView:
    """The second tiers of requests `slots` in `layer`, decoded (padding: zeros, -1)."""
    _, live, rows = read_rows(tier, layer, slots, max_len)
    scales = tier.tables.key_scales[layer, slots].reshape(-1, 1, tier.format.head_size)
    keys, values = tier.format.decode(rows, scales)
    return TierView(
        keys=torch.where(live[..., None], keys, 0.0),
        values=torch.where(live[..., None], values, 0.0),
        positions=torch.where(live, tier.format.positions(rows).long(), -1),
        scores=torch.where(live, tier.format.scores(rows), 0.0),
        lengths=tier.tables.lengths[layer, slots].reshape(-1).long())


def frozen_scales(stored: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """[N, D] the key scales a stream's rows are stored with: what it has (stored; all 0 =
    none yet), else the selection's (None = 1)."""
    fresh = torch.ones_like(stored) if given is None else given.float()
    return torch.where((stored != 0).any(dim=1, keepdim=True), stored, fresh)


@dataclass
class TierWrites:
    """A second tier's part of one compaction: rows [M, row_bytes] to write at flat row
    ids dst [M], the new lengths [N], head-blocks per request [R], the new block-table
    prefixes [N, C] and the streams' key scales [N, D]."""

    rows: torch.Tensor
    dst: torch.Tensor
    new_lengths: torch.Tensor
    blocks: torch.Tensor
    new_rows: torch.Tensor
    key_scales: torch.Tensor


def write_tier(tier: TierLayer, layer: int, slots: torch.Tensor, writes: TierWrites) -> None:
    """Write the rows, then the tables (after everything was read)."""
    per_block = tier.slots_per_block
    tier.rows[writes.dst // per_block, writes.dst % per_block] = writes.rows
    heads = tier.tables.lengths.shape[2]
    columns = min(writes.new_rows.shape[1], tier.tables.block_tables.shape[3])
    tier.tables.block_tables[layer, slots, :, :columns] = writes.new_rows[:, :columns].view(
        len(slots), heads, columns)
    tier.tables.lengths[layer, slots] = writes.new_lengths.view(-1, heads).int()
    tier.tables.key_scales[layer, slots] = writes.key_scales.view(len(slots), heads, -1)
