"""The last W queries of every request in every layer: the observation window.

Policies such as SnapKV score keys by the attention of the most recent queries. Queries
are not cached by attention, so we keep a ring buffer per (layer, request): the query of
token position p lives at ring index p % W. Writing costs one scatter per layer per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_kvcompress.cache.device_copy import host_to_device


class WindowWrites(NamedTuple):
    """Which of a step's tokens enter the window: token rows [K] into the step's query
    tensor, their request slots [K] and ring indices [K]."""

    rows: torch.Tensor
    slots: torch.Tensor
    ring: torch.Tensor


class QueryWindow:
    """Ring buffers of queries [L, max_requests, W, Hq, D] and their positions [max_requests, W]."""

    def __init__(self, num_layers: int, max_requests: int, window: int, num_heads: int,
                 head_size: int, dtype: torch.dtype, device: torch.device | str):
        self.window = window
        # Not zeroed: read() takes an entry only where its position says it was written,
        # and zeroing every request slot's window once cost seconds at engine start.
        self.queries = torch.empty(num_layers, max_requests, window, num_heads, head_size,
                                   dtype=dtype, device=device)
        self.positions = torch.full((max_requests, window), -1, dtype=torch.int64, device=device)

    def plan(self, slots: list[int], query_lens: list[int],
             positions: torch.Tensor) -> WindowWrites:
        """The writes of one step: the step's requests' slots and query lengths (host) and
        positions [tokens] of the step's tokens. Only each request's last W tokens are
        written, so no two writes hit the same ring index (a scatter with duplicates would
        be unordered). Planned on the host: which rows enter depends only on the lengths."""
        rows, row_slots, end = [], [], 0
        for slot, count in zip(slots, query_lens):
            end += count
            recent = range(end - min(count, self.window), end)
            rows.extend(recent)
            row_slots.extend([slot] * len(recent))
        device = positions.device
        rows = host_to_device(rows, torch.int64, device)
        return WindowWrites(rows, host_to_device(row_slots, torch.int64, device),
                            positions[rows] % self.window)

    def record_positions(self, writes: WindowWrites, positions: torch.Tensor) -> None:
        self.positions[writes.slots, writes.ring] = positions[writes.rows].long()

    def record(self, layer: int, writes: WindowWrites, query: torch.Tensor) -> None:
        """Store this layer's queries [tokens, Hq, D] of the planned rows."""
        self.queries[layer, writes.slots, writes.ring] = query[writes.rows].to(self.queries.dtype)

    def reset(self, slots: torch.Tensor) -> None:
        self.positions[slots] = -1

    def read(self, layer: int, slots: torch.Tensor, num_kv_heads: int,
             window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `window` (<= W) queries of requests `slots` [R], oldest first, per stream:
        (queries [R * H, G, window, D], positions [R * H, window], -1 where absent)."""
        positions = self.positions[slots]                               # [R, W]
        latest = positions.amax(dim=1, keepdim=True)                    # [R, 1]
        wanted = latest - window + 1 + torch.arange(window, device=positions.device)
        ring = wanted % self.window
        found = (positions.gather(1, ring) == wanted) & (wanted >= 0)   # [R, window]
        queries = self.queries[layer, slots[:, None], ring]             # [R, window, Hq, D]
        queries = torch.where(found[:, :, None, None], queries, 0)
        num_requests, _, num_heads, head_size = queries.shape
        group = num_heads // num_kv_heads
        # Query head q serves KV head q // G (vLLM's GQA layout).
        queries = queries.view(num_requests, window, num_kv_heads, group, head_size)
        queries = queries.permute(0, 2, 3, 1, 4).reshape(num_requests * num_kv_heads, group,
                                                         window, head_size)
        found_positions = torch.where(found, wanted, -1)
        return queries, found_positions.repeat_interleave(num_kv_heads, dim=0)
