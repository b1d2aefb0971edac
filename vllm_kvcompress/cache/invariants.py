"""Storage invariants, checked on the host (tests; this copies every table off the device).

1. No head-block is owned by two live streams; every owned head-block lies in its request's
   pages; a request's owned local head-blocks are exactly 0 .. used - 1 (bump pointer, no
   holes); no page belongs to two requests; with the caller's free list: free + owned = all.
   Shared prefix pages (`share_prefix`) are the exception: a page may belong to several
   requests when all but one of them hold it among their shared leading pages.
2. A stream's live slots are its first `length` slots, in original token order (strictly
   increasing positions); so are its second tier's rows, and no position is in both tiers.
   No full-tier length exceeds the host's bound for its request and layer.
4. A request's head-blocks of both tiers fit in its pages (used <= pages * H in every layer).
5. Free pages hold finite keys and values: second-tier rows, which read as floats may be
   NaN, are zeroed before their pages leave the request.
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
    if free_pages is not None:
        _check_free_memory(cache, free_pages)
    for layer in range(cache.num_layers):
        positions = cache.layers[layer].positions.cpu()
        block_tables = tables.block_tables[layer].cpu().tolist()
        lengths = tables.lengths[layer].cpu().tolist()
        low_tables = cache.tier_tables.block_tables[layer].cpu().tolist()
        low_lengths = cache.tier_tables.lengths[layer].cpu().tolist()
        used = tables.used_blocks[layer].cpu().tolist()
        bounds = cache.length_bounds[layer].tolist()
        owner: dict[int, tuple[int, int]] = {}
        for slot in range(cache.max_requests):
            local_of = {page: i for i, page in enumerate(pages[slot][:counts[slot]])}
            assert used[slot] <= counts[slot] * heads, \
                f"layer {layer} slot {slot}: {used[slot]} head-blocks in {counts[slot]} pages"
            tier = cache.slot_tiers[slot]
            low = None if tier is None else cache._tier_layer(layer, tier)
            assert low is not None or not any(low_lengths[slot]), \
                f"layer {layer} slot {slot}: second-tier rows without a tier"
            assert max(lengths[slot]) <= bounds[slot], \
                f"layer {layer} slot {slot}: a stream of {max(lengths[slot])} > bound {bounds[slot]}"
            taken = []
            for head in range(heads):
                where = (layer, slot, head)
                blocks = block_tables[slot][head][:-(-lengths[slot][head] // block_size)]
                low_blocks = ([] if low is None else
                              low_tables[slot][head][:-(-low_lengths[slot][head]
                                                         // low.slots_per_block)])
                for block in blocks + low_blocks:
                    assert block not in owner or block // heads in shared, (
                        f"layer {layer}: head-block {block} owned by {owner[block]} and {where}")
                    owner[block] = where
                    assert block // heads in local_of, \
                        f"layer {layer} slot {slot}: head-block {block} outside its pages"
                    taken.append(local_of[block // heads] * heads + block % heads)
                full = _ordered_positions(positions.view(-1), blocks, lengths[slot][head],
                                          block_size, where)
                if low is not None:
                    rows = low.rows[torch.tensor(low_blocks, dtype=torch.long)].cpu()
                    low_positions = low.format.positions(rows).view(-1)
                    mine = _ordered_positions(low_positions, list(range(len(low_blocks))),
                                              low_lengths[slot][head], low.slots_per_block,
                                              where)
                    assert not set(mine) & set(full), f"{where}: a position in both tiers"
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


def _check_free_memory(cache: PagedStreamCache, free_pages: torch.Tensor) -> None:
    blocks = (free_pages.long().to(cache.device)[:, None] * cache.num_kv_heads
              + torch.arange(cache.num_kv_heads, device=cache.device)).flatten()
    for layer, pools in enumerate(cache.layers):
        for name in ("keys", "values"):
            assert bool(getattr(pools, name)[blocks].isfinite().all()), \
                f"layer {layer}: a free page holds non-finite {name} (unscrubbed rows?)"


def _ordered_positions(positions: torch.Tensor, blocks: list[int], length: int,
                       block_size: int, where: tuple[int, int, int]) -> list[int]:
    """The positions of a tier's first `length` slots in `blocks` of `block_size` slots
    (positions: flat, indexed like those slots), checked to be in token order."""
    if length == 0:
        return []
    slots = torch.tensor(blocks)[:, None] * block_size + torch.arange(block_size)
    stream_positions = positions[slots.view(-1)[:length]]
    assert bool((stream_positions[1:] > stream_positions[:-1]).all()), \
        f"(layer, slot, head) {where}: positions not in token order: {stream_positions.tolist()}"
    return stream_positions.tolist()
