"""Head-block allocation for new tokens: a bump pointer over each request's pages.

Appending k tokens to a request adds k slots to each of its L * H streams. A stream whose
new length crosses into further head-blocks takes the next local head-block indices of its
(layer, request), block by block: first every growing stream's first new block (heads in
order), then every second one, and so on. Streams of equal length (never compressed) thus
lay out page p as head-block p of each head, vLLM's own layout, which is what lets their
full pages be shared through vLLM's prefix cache. Lengths differ per layer and head after
head-wise compression, so the growth is computed for all (L, R, H) at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.stream_tables import StreamTables


def blocks_for(lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """Head-blocks holding `lengths` slots."""
    return (lengths + block_size - 1) // block_size


@dataclass
class Growth:
    """How appending num_new [R] tokens grows requests `slots` [R]; [L, R, H] and [L, R]."""

    lengths: torch.Tensor       # [L, R, H] int64 before
    new_lengths: torch.Tensor   # [L, R, H] int64 after
    new_blocks: torch.Tensor    # [L, R, H] int64 head-blocks each stream gains
    used_after: torch.Tensor    # [L, R] int64 local head-blocks taken after


def plan_growth(tables: StreamTables, slots: torch.Tensor, num_new: torch.Tensor,
                block_size: int) -> Growth:
    lengths = tables.lengths[:, slots].long()
    new_lengths = lengths + num_new[None, :, None]
    new_blocks = blocks_for(new_lengths, block_size) - blocks_for(lengths, block_size)
    used_after = tables.used_blocks[:, slots].long() + new_blocks.sum(dim=2)
    return Growth(lengths, new_lengths, new_blocks, used_after)


def pages_needed(growth: Growth, num_kv_heads: int) -> torch.Tensor:
    """[R] int64 pages each request needs to hold its head-blocks after the growth."""
    return blocks_for(growth.used_after, num_kv_heads).amax(dim=0)


def append_tokens(tables: StreamTables, slots: torch.Tensor, num_new: torch.Tensor,
                  num_tokens: int, max_new: int, block_size: int) -> torch.Tensor:
    """Grow the streams of requests `slots` [R] by num_new [R] tokens each.

    num_tokens = sum(num_new) and max_new = max(num_new) come from the host (they size
    tensors). Returns the new tokens' flat slot ids [L, num_tokens, H] int64, request-major
    like the batch's tokens. Raises (changing nothing) when a request's pages are too few.
    """
    growth = plan_growth(tables, slots, num_new, block_size)
    _check_capacity(tables, slots, growth, block_size)
    _assign_new_blocks(tables, slots, growth, block_size, max_new)
    slot_ids = _token_slot_ids(tables, slots, num_new, growth.lengths, num_tokens, block_size)
    tables.lengths[:, slots] = growth.new_lengths.int()
    tables.used_blocks[:, slots] = growth.used_after.int()
    return slot_ids


def _check_capacity(tables: StreamTables, slots: torch.Tensor, growth: Growth,
                    block_size: int) -> None:
    capacity = tables.page_counts[slots].long() * tables.num_kv_heads          # [R]
    too_few_pages = growth.used_after > capacity[None, :]                       # [L, R]
    too_long = blocks_for(growth.new_lengths, block_size) > tables.max_blocks_per_stream
    # One host sync per step: the only way to fail with a clear error instead of
    # writing into another request's pages.
    if not bool(too_few_pages.any() | too_long.any()):
        return
    if too_long.any():
        raise RuntimeError(f"a stream would exceed max_blocks_per_stream="
                           f"{tables.max_blocks_per_stream} head-blocks")
    layer, request = (int(i) for i in too_few_pages.nonzero()[0])
    needed = int(pages_needed(growth, tables.num_kv_heads)[request])
    held = int(tables.page_counts[slots[request]])
    raise RuntimeError(f"request slot {int(slots[request])} needs {needed} pages for this "
                       f"append (layer {layer}) but holds {held}; add_pages first")


def _assign_new_blocks(tables: StreamTables, slots: torch.Tensor, growth: Growth,
                       block_size: int, max_new: int) -> None:
    """Write the gained head-blocks into the block tables (bump pointer, block-major)."""
    num_layers, num_requests, num_heads = growth.new_blocks.shape
    device = slots.device
    gained = growth.new_blocks
    j = torch.arange(-(-max_new // block_size), device=device)  # most blocks a stream gains
    takes = (gained[..., None] > j).long()                      # [L, R, H, J]: block j is new
    per_round = takes.sum(dim=2)                                                # [L, R, J]
    before_round = per_round.cumsum(dim=2) - per_round
    local = (tables.used_blocks[:, slots].long()[..., None, None] + before_round[:, :, None, :]
             + takes.cumsum(dim=2) - takes)                                     # [L, R, H, J]
    physical = tables.physical_blocks(slots[None, :, None, None], local)
    column = blocks_for(growth.lengths, block_size)[..., None] + j
    # Masked-out entries go to the scratch column instead of being filtered out.
    column = torch.where(j < gained[..., None], column, tables.max_blocks_per_stream)
    tables.block_tables_with_scratch[
        torch.arange(num_layers, device=device)[:, None, None, None],
        slots[None, :, None, None],
        torch.arange(num_heads, device=device)[None, None, :, None],
        column] = physical.int()


def _token_slot_ids(tables: StreamTables, slots: torch.Tensor, num_new: torch.Tensor,
                    old_lengths: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """[L, num_tokens, H] flat slot ids of the new tokens in every stream."""
    device = slots.device
    num_layers, num_requests, num_heads = old_lengths.shape
    request_of_token = torch.repeat_interleave(torch.arange(num_requests, device=device),
                                               num_new, output_size=num_tokens)
    first_token = num_new.cumsum(0) - num_new
    token_in_request = torch.arange(num_tokens, device=device) - first_token[request_of_token]
    index = old_lengths[:, request_of_token, :] + token_in_request[None, :, None]
    blocks = tables.block_tables[torch.arange(num_layers, device=device)[:, None, None],
                                 slots[request_of_token][None, :, None],
                                 torch.arange(num_heads, device=device)[None, None, :],
                                 index // block_size]
    return blocks.long() * block_size + index % block_size
