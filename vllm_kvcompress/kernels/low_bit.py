"""The packed low-bit row: one token of one KV head in a few bytes.

A low-bit head-block is the same memory as a full one (a cell of vLLM's KV tensor, two
blocks of `block_size` D-vectors), read as rows of `row_bytes` bytes, so it holds
`slots_per_block(cell_bytes)` tokens instead of `block_size`. A row is

    key codes   key_bits * D / 8 bytes    bit planes: byte i of plane j holds bit j of the
    value codes value_bits * D / 8 bytes  codes of channels 8i .. 8i + 7 (channel 8i + c
                                          in bit c)
    (padding to a multiple of 4 bytes)
    params      4 x float16               key step, key minimum, value step, value minimum
    position    int32                     the token's position
    score       float32                   its rank in the tier (the score it was demoted with)

Quantization is per token and asymmetric: step = (max - min) / (2**bits - 1) and the
minimum are rounded to float16 first, then code = clamp(round((x - min) / step)), and x
reads back as code * step + min in float32. Keys are quantized after multiplying by the
stream's key scales (MiKV's outlier balancing, per channel) and read back divided by them.
The torch functions here are the format's definition; the Triton attention decodes the
same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Bytes of a row after its codes: 4 float16 parameters, an int32 position, a float32 score.
PARAM_BYTES = 8
META_BYTES = 8
FLOAT16_MAX = torch.finfo(torch.float16).max
_BIT = torch.arange(8, dtype=torch.uint8)


@dataclass(frozen=True)
class LowBitFormat:
    """The row layout for head size D (a multiple of 8) at key_bits / value_bits (1..8)."""

    head_size: int
    key_bits: int
    value_bits: int

    def __post_init__(self) -> None:
        if self.head_size % 8:
            raise ValueError(f"head_size={self.head_size}: the low-bit tier needs a multiple of 8")
        for name in ("key_bits", "value_bits"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"{name}={getattr(self, name)}: must be in 1..8")

    @property
    def plane_bytes(self) -> int:
        return self.head_size // 8

    @property
    def value_offset(self) -> int:
        return self.key_bits * self.plane_bytes

    @property
    def params_offset(self) -> int:
        # 4-byte aligned, so the int32 and float32 fields after the params are too.
        return -(-(self.key_bits + self.value_bits) * self.plane_bytes // 4) * 4

    @property
    def position_offset(self) -> int:
        return self.params_offset + PARAM_BYTES

    @property
    def row_bytes(self) -> int:
        return self.position_offset + META_BYTES

    def slots_per_block(self, cell_bytes: int) -> int:
        """Tokens a head-block of `cell_bytes` bytes holds in this format."""
        return cell_bytes // self.row_bytes

    def row_pool(self, cells: torch.Tensor) -> torch.Tensor:
        """[num_head_blocks, P, row_bytes] uint8 view of head-block cells
        [num_head_blocks, cell_bytes] uint8 (each cell's first P * row_bytes bytes)."""
        slots = self.slots_per_block(cells.shape[1])
        return cells[:, :slots * self.row_bytes].view(cells.shape[0], slots, self.row_bytes)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor, key_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [M, row_bytes] uint8 of M tokens: keys, values [M, D] (any float dtype),
        positions [M] int, scores [M] float, key_scales [M, D] float32 (> 0) or None (= 1)."""
        keys = keys.float() if key_scales is None else keys.float() * key_scales
        key_codes, key_step, key_min = quantize(keys, self.key_bits)
        value_codes, value_step, value_min = quantize(values.float(), self.value_bits)
        params = torch.stack([key_step, key_min, value_step, value_min], dim=1)      # fp16
        codes = torch.cat([pack_planes(key_codes, self.key_bits),
                           pack_planes(value_codes, self.value_bits)], dim=1)
        padding = codes.new_zeros(codes.shape[0], self.params_offset - codes.shape[1])
        return torch.cat([codes, padding, _bytes(params),
                          _bytes(positions.to(torch.int32)[:, None]),
                          _bytes(scores.to(torch.float32)[:, None])], dim=1)

    def decode(self, rows: torch.Tensor, key_scales: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [..., D] float32 of rows [..., row_bytes] uint8; key_scales
        broadcastable to the keys (0 = none fixed yet: read as 1), or None (= 1)."""
        params = self.params(rows)
        keys = dequantize(unpack_planes(rows[..., :self.value_offset], self.key_bits),
                          params[..., 0], params[..., 1])
        value_end = self.value_offset + self.value_bits * self.plane_bytes
        values = dequantize(unpack_planes(rows[..., self.value_offset:value_end],
                                          self.value_bits), params[..., 2], params[..., 3])
        if key_scales is not None:
            keys = keys / torch.where(key_scales != 0, key_scales, 1.0)
        return keys, values

    def params(self, rows: torch.Tensor) -> torch.Tensor:
        """[..., 4] float32: key step, key minimum, value step, value minimum."""
        return _field(rows, self.params_offset, PARAM_BYTES, torch.float16).float()

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """[...] int32 token positions of rows [..., row_bytes]."""
        return _field(rows, self.position_offset, 4, torch.int32)[..., 0]

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """[...] float32 ranks of rows [..., row_bytes]."""
        return _field(rows, self.position_offset + 4, 4, torch.float32)[..., 0]

    def round_trip(self, keys: torch.Tensor, values: torch.Tensor,
                   key_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What M tokens read back as after being stored: (keys, values) [M, D] float32."""
        positions = torch.zeros(keys.shape[0], dtype=torch.int32, device=keys.device)
        rows = self.encode(keys, values, positions, positions.float(), key_scales)
        return self.decode(rows, key_scales)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric round-to-nearest of x [M, D] float32: (codes [M, D] uint8, step
    [M] float16, minimum [M] float16). A row whose step rounds to 0 gets codes 0."""
    levels = 2 ** bits - 1
    low = x.amin(dim=1).clamp(-FLOAT16_MAX, FLOAT16_MAX).half()
    step = ((x.amax(dim=1) - low.float()) / levels).clamp(0, FLOAT16_MAX).half()
    safe = torch.where(step > 0, step.float(), 1.0)
    codes = torch.round((x - low.float()[:, None]) / safe[:, None]).clamp(0, levels)
    return torch.where(step[:, None] > 0, codes, 0).to(torch.uint8), step, low


def dequantize(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """codes [..., D] uint8, step / low [...] float32 -> [..., D] float32."""
    return torch.addcmul(low[..., None], codes.float(), step[..., None])


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [M, D] uint8 (< 2**bits) -> [M, bits * D / 8] uint8 bit planes."""
    weights = (1 << _BIT.to(codes.device)).to(torch.uint8)
    planes = [(((codes >> j) & 1).view(codes.shape[0], codes.shape[1] // 8, 8) * weights)
              .sum(dim=2, dtype=torch.uint8) for j in range(bits)]
    return torch.cat(planes, dim=1)


def unpack_planes(planes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., bits * D / 8] uint8 bit planes -> codes [..., D] uint8."""
    shape = planes.shape[:-1]
    plane_bytes = planes.shape[-1] // bits
    bit = (planes.reshape(*shape, bits, plane_bytes, 1) >> _BIT.to(planes.device)) & 1
    bit = bit.reshape(*shape, bits, plane_bytes * 8)
    codes = torch.zeros(bit.shape[:-2] + bit.shape[-1:], dtype=torch.uint8, device=planes.device)
    for j in range(bits):
        codes |= bit[..., j, :] << j
    return codes


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """[M, k] tensor -> [M, k * itemsize] uint8 (its bytes)."""
    return x.contiguous().view(torch.uint8)


def _field(rows: torch.Tensor, offset: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [offset, offset + size) of rows [..., row_bytes] as `dtype` [..., size / itemsize]
    (a view: the row size and the offsets are multiples of 4)."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    start = offset // dtype.itemsize
    return rows.view(dtype)[..., start:start + size // dtype.itemsize]
