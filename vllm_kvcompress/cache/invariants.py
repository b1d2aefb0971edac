"""Storage invariants, checked on the host (tests; this copies every table off the device).

1. No head-block is owned by two live streams; every owned head-block lies in its request's
   pages; a request's owned local head-blocks are exactly 0 .. used - 1 (bump pointer, no
   holes); no page belongs to two requests; with the caller's free list: free + owned = all.
   Shared prefix pages (`share_prefix`) are the exception: a page may belong to several
   requests when all but one of them hold it among their shared leading pages.
2. A stream's live slots are its first `length` slots, in original token order (strictly
   increasing positions).
4. A request's head-blocks fit in its pages (used <= pages * H in every layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm_kvcompress.cache.paged_stream_cache import PagedStreamCache


def check_invariants(cache: PagedStreamCache, free_pages: torch.Tensor | None = None) -> None:
    tables = cache.tables
    heads, block_size = cache.num_kv_heads, cache.block_size
    pages = tables.request_pages.cpu().tolist()
    counts = tables.page_counts.cpu().tolist()
    shared = {p for slot, row in enumerate(pages) for p in row[:cache.shared_pages[slot]]}
    _check_pages(pages, counts, cache.shared_pages, cache.num_pages, free_pages)
    for layer in range(cache.num_layers):
        positions = cache.layers[layer].positions.cpu()
        block_tables = tables.block_tables[layer].cpu().tolist()
        lengths = tables.lengths[layer].cpu().tolist()
        used = tables.used_blocks[layer].cpu().tolist()
        owner: dict[int, tuple[int, int]] = {}
        for slot in range(cache.max_requests):
            local_of = {page: i for i, page in enumerate(pages[slot][:counts[slot]])}
            assert used[slot] <= counts[slot] * heads, \
                f"layer {layer} slot {slot}: {used[slot]} head-blocks in {counts[slot]} pages"
            taken = []
            for head in range(heads):
                blocks = block_tables[slot][head][:-(-lengths[slot][head] // block_size)]
                for block in blocks:
                    assert block not in owner or block // heads in shared, (
                        f"layer {layer}: head-block {block} owned by {owner[block]} and "
                        f"{(slot, head)}")
                    owner[block] = (slot, head)
                    assert block // heads in local_of, \
                        f"layer {layer} slot {slot}: head-block {block} outside its pages"
                    taken.append(local_of[block // heads] * heads + block % heads)
                _check_order(positions, blocks, lengths[slot][head], block_size,
                             (layer, slot, head))
            assert sorted(taken) == list(range(used[slot])), \
                f"layer {layer} slot {slot}: local head-blocks {sorted(taken)}, used {used[slot]}"


def _check_pages(pages, counts, shared_counts, num_pages: int,
                 free_pages: torch.Tensor | None) -> None:
    writable = [p for slot, row in enumerate(pages)
                for p in row[shared_counts[slot]:counts[slot]]]
    assert len(writable) == len(set(writable)), \
        "a page belongs to two requests (or twice to one) outside a shared prefix"
    owned = {p for slot, row in enumerate(pages) for p in row[:counts[slot]]}
    if free_pages is not None:
        free = free_pages.cpu().tolist()
        assert len(free) == len(set(free)), "a page is free twice"
        assert not set(free) & set(owned), "a page is both free and owned"
        assert set(free) | set(owned) == set(range(num_pages)), "free + owned != all pages"


def _check_order(positions: torch.Tensor, blocks: list[int], length: int, block_size: int,
                 where: tuple[int, int, int]) -> None:
    if length == 0:
        return
    slots = torch.tensor(blocks)[:, None] * block_size + torch.arange(block_size)
    stream_positions = positions.view(-1)[slots.view(-1)[:length]]
    assert bool((stream_positions[1:] > stream_positions[:-1]).all()), \
        f"(layer, slot, head) {where}: positions not in token order: {stream_positions.tolist()}"
