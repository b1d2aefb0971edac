"""The cache's tables: which head-blocks each stream uses, which pages each request owns,
and where a stream's slots are (`stream_slot_ids`).

Indexed by a request SLOT (0 .. max_requests - 1) that the caller assigns. All tensors live
on the cache's device:
  block_tables  [L, S, H, max_blocks]  int32  physical head-block id of each stream's blocks
                                              (entries past ceil(length / block_size) are stale)
  lengths       [L, S, H]              int32  live slots per stream
  used_blocks   [L, S]                 int32  head-blocks taken in the request's pages: local
                                              indices 0 .. used - 1 (bump pointer)
  request_pages [S, max_pages]         int32  the request's pages, in the order given
  page_counts   [S]                    int32  how many of them are valid
Local head-block i of a request lives in page request_pages[i // H], physical id
request_pages[i // H] * H + i % H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamTables:
    block_tables: torch.Tensor
    lengths: torch.Tensor
    used_blocks: torch.Tensor
    request_pages: torch.Tensor
    page_counts: torch.Tensor
    # block_tables plus one scratch column, where vectorized appends send their
    # masked-out writes instead of filtering them (filtering would need a host sync).
    block_tables_with_scratch: torch.Tensor

    @classmethod
    def create(cls, num_layers: int, num_kv_heads: int, max_requests: int,
               max_pages_per_request: int, max_blocks_per_stream: int,
               device: torch.device | str) -> StreamTables:
        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.int32, device=device)

        with_scratch = zeros(num_layers, max_requests, num_kv_heads, max_blocks_per_stream + 1)
        return cls(block_tables=with_scratch[..., :max_blocks_per_stream],
                   lengths=zeros(num_layers, max_requests, num_kv_heads),
                   used_blocks=zeros(num_layers, max_requests),
                   request_pages=zeros(max_requests, max_pages_per_request),
                   page_counts=zeros(max_requests),
                   block_tables_with_scratch=with_scratch)

    @property
    def num_kv_heads(self) -> int:
        return self.lengths.shape[2]

    @property
    def max_blocks_per_stream(self) -> int:
        return self.block_tables.shape[3]

    def physical_blocks(self, slots: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Physical head-block ids (int64) of local indices `local` of requests `slots`
        (int64, broadcastable to `local`). Indices past a request's pages give
        meaningless ids that callers mask out."""
        heads = self.num_kv_heads
        page_index = (local // heads).clamp(max=self.request_pages.shape[1] - 1)
        return self.request_pages[slots, page_index].long() * heads + local % heads


def stream_slot_ids(block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slot ids [..., T] of the first T = max_len slots of each stream, and the live
    mask [..., T] (slot index < length). Dead slots get id 0, so they can be read safely.

    block_tables: [..., max_blocks] head-block ids; lengths: [...].
    """
    t = torch.arange(max_len, device=block_tables.device)
    block_index = (t // block_size).clamp(max=block_tables.shape[-1] - 1)
    blocks = block_tables.long().gather(-1, block_index.expand(*block_tables.shape[:-1], -1))
    live = t < lengths[..., None]
    return torch.where(live, blocks * block_size + t % block_size, 0), live
