"""One request's KV for one layer, per KV head, as the reference runner keeps it.

Each KV head is a stream with its own length: tensors are padded to a capacity C and only
the first `lengths[h]` slots of head h are live, in original token order. Next to K/V every
slot keeps its token position and accumulated attention; the layer also keeps the last W
queries of every query head (the observation window), as the vLLM path does. A second
tier is kept as the paged cache reads it back: a low-bit tier as one more set of streams
(`low`), a narrow-key tier as the first `narrow_lengths` slots of each stream, their keys
zeroed in the pruned channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.low_tier import low_tier_after
from vllm_kvcompress.cache.narrow_tier import settle_narrowing
from vllm_kvcompress.cache.second_tier import TierView, frozen_scales
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier, Selection
from vllm_kvcompress.policies.apply import apply_selection
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
    narrow_lengths:   [H] int64 narrow-key slots at the start of each stream
    key_scales:       [H, D] float32 how the second tier stores keys (0 = not fixed yet)
    scorer_state:     [1, H, N] a stateful trained scorer's context (None without one)
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    acc_scores: torch.Tensor
    lengths: torch.Tensor
    window_queries: torch.Tensor
    window_positions: torch.Tensor
    low: TierView | None = None
    narrow_lengths: torch.Tensor | None = None
    key_scales: torch.Tensor | None = None
    scorer_state: torch.Tensor | None = None

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
        copies = {name: None if x is None else x.clone() for name, x in vars(self).items()
                  if name != "low"}
        low = None if self.low is None else TierView(*(x.clone() for x in vars(self.low).values()))
        return LayerStreams(**copies, low=low)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor | None = None) -> None:
        """Write S new tokens after each stream's live slots.

        keys, values: [H, S, D]; positions: [S] int64; scores: [H, S] float32 their
        initial acc_scores (a trained scorer's), None for zeros.
        """
        new = keys.shape[1]
        if self.max_length + new > self.capacity:
            self._grow(self.max_length + new + GROWTH)
        heads = torch.arange(keys.shape[0])[:, None]
        slots = self.lengths[:, None] + torch.arange(new)[None, :]                # [H, S]
        self.keys[heads, slots] = keys.to(self.keys.dtype)
        self.values[heads, slots] = values.to(self.values.dtype)
        self.positions[heads, slots] = positions[None, :]
        self.acc_scores[heads, slots] = 0.0 if scores is None else scores.float()
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

    def compact(self, batch: StreamBatch, selection: Selection) -> None:
        """Apply a policy's `selection` over `batch` (this layer's streams, as stream_batch
        gave them) the way the paged cache does, second tier included."""
        heads, _, head_size = batch.keys.shape
        if self.key_scales is None:
            self.key_scales = torch.zeros(heads, head_size)
            self.narrow_lengths = torch.zeros(heads, dtype=torch.long)
        tier = selection.second_tier
        if isinstance(tier, LowBitTier):
            scales = frozen_scales(self.key_scales, selection.key_scales)
            fmt = LowBitFormat(head_size, tier.key_bits, tier.value_bits)
            self.low = low_tier_after(self.low or TierView.empty(heads, head_size), batch,
                                      selection, tier, fmt, scales)
            self.key_scales = scales
        elif isinstance(tier, NarrowKeyTier):
            selection, self.key_scales = settle_narrowing(selection, self.key_scales,
                                                          self.narrow_lengths)
            self.narrow_lengths = (selection.narrow & batch.live_mask()).sum(dim=1)
        self.replace_streams(apply_selection(batch, selection))

    def second_tier_lengths(self) -> torch.Tensor:
        """[H] int64 tokens each stream holds in its second tier."""
        if self.low is not None:
            return self.low.lengths
        if self.narrow_lengths is not None:
            return self.narrow_lengths
        return torch.zeros_like(self.lengths)

    def second_tier_positions(self) -> list[torch.Tensor]:
        """Token positions in each stream's second tier: H tensors of int64, in token order
        (empty when there is none)."""
        if self.low is not None:
            return [self.low.positions[h, :n].clone() for h, n in enumerate(self.low.lengths.tolist())]
        narrow = self.second_tier_lengths().tolist()
        return [self.positions[h, :n].clone() for h, n in enumerate(narrow)]

    def kept_positions(self) -> list[torch.Tensor]:
        """Token positions held by each stream at full width: H tensors of int64, in slot
        order."""
        narrow = self.narrow_lengths.tolist() if self.narrow_lengths is not None else [0] * len(self.lengths)
        return [self.positions[h, start:n].clone()
                for h, (start, n) in enumerate(zip(narrow, self.lengths.tolist()))]

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        pad = torch.nn.functional.pad
        self.keys = pad(self.keys, (0, 0, 0, extra))
        self.values = pad(self.values, (0, 0, 0, extra))
        self.positions = pad(self.positions, (0, extra), value=-1)
        self.acc_scores = pad(self.acc_scores, (0, extra))
