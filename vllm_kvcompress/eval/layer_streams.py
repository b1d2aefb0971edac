"""One request's KV for one layer, per KV head, as the reference runner keeps it.

Each KV head is a stream with its own length: tensors are padded to a capacity C and only
the first `lengths[h]` slots of head h are live, in original token order. Next to K/V every
slot keeps its token position and accumulated attention; the layer also keeps the last W
queries of every query head (the observation window), as the vLLM path does. Policies with
a low-bit tier add one more tier per stream (`low`, kept as the cache reads it back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.low_tier import (LowTierView, frozen_balance, low_tier_after)
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

# Extra slots allocated when a stream outgrows its tensors (saves a copy per decode step).
GROWTH = 64


@dataclass
class LayerStreams:
    """H KV heads, G query heads per KV head, capacity C, head size D, window capacity W.

    keys, values:     [H, C, D]  keys after RoPE
    positions:        [H, C] int64  token position of each slot (-1 beyond the length)
    acc_scores:       [H, C] float32  attention summed over all queries and the G heads
    lengths:          [H] int64
    window_queries:   [H, G, W, D]  last W queries after RoPE, oldest first (zeros if absent)
    window_positions: [W] int64  their token positions (-1 = absent)
    low:              the low-bit tier ([H, A, D] keys and values as read back, positions,
                      ranks, lengths), None before a policy with one compressed the layer
    key_balance:      [H, D] float32 outlier balancing of the low-bit keys (0 = not fixed)
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    acc_scores: torch.Tensor
    lengths: torch.Tensor
    window_queries: torch.Tensor
    window_positions: torch.Tensor
    low: LowTierView | None = None
    key_balance: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_kv_heads: int, group: int, head_size: int, window: int,
              capacity: int, dtype: torch.dtype) -> LayerStreams:
        h, c, d = num_kv_heads, capacity, head_size
        return cls(
            keys=torch.zeros(h, c, d, dtype=dtype), values=torch.zeros(h, c, d, dtype=dtype),
            positions=torch.full((h, c), -1, dtype=torch.long),
            acc_scores=torch.zeros(h, c, dtype=torch.float32),
            lengths=torch.zeros(h, dtype=torch.long),
            window_queries=torch.zeros(h, group, window, d, dtype=dtype),
            window_positions=torch.full((window,), -1, dtype=torch.long),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max())

    def clone(self) -> LayerStreams:
        low = None if self.low is None else LowTierView(*(x.clone() for x in vars(self.low).values()))
        return LayerStreams(
            *(tensor.clone() for name, tensor in vars(self).items() if name not in ("low", "key_balance")),
            low=low, key_balance=None if self.key_balance is None else self.key_balance.clone())

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Write S new tokens after each stream's live slots.

        keys, values: [H, S, D]; positions: [S] int64.
        """
        new = keys.shape[1]
        if self.max_length + new > self.capacity:
            self._grow(self.max_length + new + GROWTH)
        heads = torch.arange(keys.shape[0])[:, None]
        slots = self.lengths[:, None] + torch.arange(new)[None, :]                # [H, S]
        self.keys[heads, slots] = keys.to(self.keys.dtype)
        self.values[heads, slots] = values.to(self.values.dtype)
        self.positions[heads, slots] = positions[None, :]
        self.acc_scores[heads, slots] = 0.0
        self.lengths += new

    def push_queries(self, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Slide the observation window over S new queries [H, G, S, D] at positions [S]."""
        window = self.window_positions.shape[0]
        if window == 0:
            return
        self.window_queries = torch.cat([self.window_queries, queries.to(self.window_queries.dtype)],
                                        dim=2)[:, :, -window:].contiguous()
        self.window_positions = torch.cat([self.window_positions, positions])[-window:].contiguous()

    def stream_batch(self, layer: int, num_layers: int, scale: float,
                     window: int | None) -> StreamBatch:
        """A policy's view of this layer: copies trimmed to the longest stream.

        window: queries to include (the policy's W, at most the capacity), None for none.
        """
        length = self.max_length
        batch = StreamBatch(
            keys=self.keys[:, :length].clone(), values=self.values[:, :length].clone(),
            lengths=self.lengths.clone(), positions=self.positions[:, :length].clone(),
            acc_scores=self.acc_scores[:, :length].clone(), num_kv_heads=self.keys.shape[0],
            layer=layer, num_layers=num_layers, scale=scale,
        )
        if window is not None:
            kept = min(window, self.window_positions.shape[0])
            start = self.window_positions.shape[0] - kept
            batch.window_queries = self.window_queries[:, :, start:].clone()
            batch.window_positions = self.window_positions[start:].expand(batch.num_streams, -1).clone()
        return batch

    def replace_streams(self, batch: StreamBatch) -> None:
        """Take the (compacted) streams of `batch`; the observation window stays."""
        h, length = batch.keys.shape[:2]
        live = batch.live_mask()
        # Padding from a policy may hold anything; attention must see zeros there.
        self.keys = torch.where(live[..., None], batch.keys, 0).to(self.keys.dtype)
        self.values = torch.where(live[..., None], batch.values, 0).to(self.values.dtype)
        self.positions = torch.where(live, batch.positions, -1)
        self.acc_scores = torch.where(live, batch.acc_scores.float(), 0.0)
        self.lengths = batch.lengths.clone()
        self._grow(length + GROWTH)

    def demote(self, batch: StreamBatch, selection: Selection, tier: LowBitTier) -> None:
        """Add the slots `selection` demotes from `batch` (this layer's streams before the
        compaction) to the low-bit tier, as the paged cache stores them (cache/low_tier.py)."""
        heads, _, head_size = batch.keys.shape
        if self.low is None:
            self.low = LowTierView(torch.zeros(heads, 0, head_size), torch.zeros(heads, 0, head_size),
                                   torch.zeros(heads, 0, dtype=torch.long), torch.zeros(heads, 0),
                                   torch.zeros(heads, dtype=torch.long))
            self.key_balance = torch.zeros(heads, head_size)
        balance = frozen_balance(self.key_balance, selection.key_balance)
        fmt = LowBitFormat(head_size, tier.key_bits, tier.value_bits)
        self.low = low_tier_after(self.low, batch, selection, tier, fmt, balance)
        self.key_balance = balance

    def low_positions(self) -> list[torch.Tensor]:
        """Token positions in each stream's low-bit tier: H tensors of int64 (empty when
        there is none), in token order."""
        if self.low is None:
            return [torch.zeros(0, dtype=torch.long) for _ in range(self.keys.shape[0])]
        return [self.low.positions[h, :n].clone() for h, n in enumerate(self.low.lengths.tolist())]

    def kept_positions(self) -> list[torch.Tensor]:
        """Token positions held by each stream: H tensors of int64, in slot order."""
        return [self.positions[h, :n].clone() for h, n in enumerate(self.lengths.tolist())]

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        pad = torch.nn.functional.pad
        self.keys = pad(self.keys, (0, 0, 0, extra))
        self.values = pad(self.values, (0, 0, 0, extra))
        self.positions = pad(self.positions, (0, extra), value=-1)
        self.acc_scores = pad(self.acc_scores, (0, extra))
