"""The narrow-key row: one token whose key lost its pruned channels (ThinK).

A row is the token's key on its stream's kept channels (K of D, in channel order), its full
value, both in the model's dtype, then (padded to 4 bytes) its position (int32) and score
(float32), in a head-block's memory read as rows (kernels/low_bit.py does the same). Which
channels a stream keeps is its key scales (cache/second_tier.py): channel c is kept where
s_c != 0, stored as k_c * s_c and read back divided by s_c; pruned channels read as 0, so
q.k over a read-back key is q.k over the kept channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NarrowKeyFormat:
    """Rows of `kept_channels` key channels out of head_size, and values, in `dtype`."""

    head_size: int
    kept_channels: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not 1 <= self.kept_channels <= self.head_size:
            raise ValueError(f"kept_channels={self.kept_channels}: must be in 1..{self.head_size}")

    @property
    def value_offset(self) -> int:
        return self.kept_channels * self.dtype.itemsize

    @property
    def position_offset(self) -> int:
        end = (self.kept_channels + self.head_size) * self.dtype.itemsize
        return -(-end // 4) * 4

    @property
    def row_bytes(self) -> int:
        return self.position_offset + 8

    def slots_per_block(self, cell_bytes: int) -> int:
        return cell_bytes // self.row_bytes

    def row_pool(self, cells: torch.Tensor) -> torch.Tensor:
        """[num_head_blocks, P, row_bytes] uint8 view of head-block cells [num_head_blocks,
        cell_bytes] uint8."""
        slots = self.slots_per_block(cells.shape[1])
        return cells[:, :slots * self.row_bytes].view(cells.shape[0], slots, self.row_bytes)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor, key_scales: torch.Tensor) -> torch.Tensor:
        """Rows [M, row_bytes] uint8: keys, values [M, D], positions [M], scores [M],
        key_scales [M, D] (each row with exactly kept_channels non-zero entries)."""
        channels = self.channels(key_scales)
        kept = (keys.float() * key_scales).gather(-1, channels)
        parts = [kept.to(self.dtype), values.to(self.dtype)]
        data = torch.cat([part.contiguous().view(torch.uint8) for part in parts], dim=1)
        padding = data.new_zeros(data.shape[0], self.position_offset - data.shape[1])
        return torch.cat([data, padding, positions.to(torch.int32)[:, None].view(torch.uint8),
                          scores.to(torch.float32)[:, None].contiguous().view(torch.uint8)], dim=1)

    def decode(self, rows: torch.Tensor, key_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [..., D] float32 of rows [..., row_bytes] uint8; key_scales
        broadcastable to [..., D]."""
        shape = rows.shape[:-1]
        kept = _field(rows, 0, self.value_offset, self.dtype).float()
        values = _field(rows, self.value_offset, self.head_size * self.dtype.itemsize,
                        self.dtype).float()
        scales = key_scales.float().expand(*shape, self.head_size)
        channels = self.channels(scales)
        kept = kept / scales.gather(-1, channels)
        keys = torch.zeros(*shape, self.head_size, device=rows.device).scatter_(-1, channels, kept)
        return keys, values

    def channels(self, key_scales: torch.Tensor) -> torch.Tensor:
        """[..., K] int64: the kept channels of each row, ascending."""
        kept = (key_scales != 0).to(torch.int8)
        # Stable: the kept channels come first, in ascending order.
        return kept.argsort(dim=-1, descending=True, stable=True)[..., :self.kept_channels]

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        return _field(rows, self.position_offset, 4, torch.int32)[..., 0]

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        return _field(rows, self.position_offset + 4, 4, torch.float32)[..., 0]


def _field(rows: torch.Tensor, offset: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [offset, offset + size) of rows [..., row_bytes] as `dtype` (a view: the row
    size and the offsets are multiples of the element sizes)."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    start = offset // dtype.itemsize
    return rows.view(dtype)[..., start:start + size // dtype.itemsize]
