"""Compaction time vs number of streams and their lengths.

R requests x H KV heads of one layer hold `length` tokens each; a compaction keeps half of
each stream's slots (a different random half per head, so the streams come out at the
same length but the moves are scattered), either evicting the rest or merging each evicted
slot into a random kept slot of its stream. Each run restores the tables first, so every
run does the same work.

    python benchmarks/bench_compaction.py            # CPU: torch reference
    python benchmarks/bench_compaction.py --device cuda
"""

from __future__ import annotations

import argparse

import torch

from timing import machine, median_ms, parse, print_table, triton_runs
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.policies.selection import Selection

HEADS, HEAD_DIM, BLOCK_SIZE = 8, 128, 32


def filled_cache(num_requests: int, length: int, dtype, device, impl) -> PagedStreamCache:
    pages = -(-length // BLOCK_SIZE)
    cache = PagedStreamCache(1, HEADS, HEAD_DIM, num_pages=num_requests * pages,
                             max_requests=num_requests, max_pages_per_request=pages,
                             block_size=BLOCK_SIZE, dtype=dtype, device=device, impl=impl)
    for r in range(num_requests):
        cache.add_pages(r, range(r * pages, (r + 1) * pages))
    cache.append(range(num_requests), [length] * num_requests)
    cache.layers[0].keys.normal_()
    cache.layers[0].values.normal_()
    return cache


def half_selection(num_streams: int, length: int, merge: bool, device) -> Selection:
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(num_streams, length, generator=gen).argsort(dim=1)
    keep = torch.zeros(num_streams, length, dtype=torch.bool)
    keep.scatter_(1, order[:, :length // 2], True)
    if not merge:
        return Selection(keep=keep.to(device))
    kept = order[:, :length // 2]
    pick = kept.gather(1, torch.randint(0, length // 2, (num_streams, length), generator=gen))
    merge_into = torch.where(keep, torch.arange(length), pick)
    return Selection(keep=keep.to(device), merge_into=merge_into.to(device),
                     weights=torch.rand(num_streams, length, generator=gen).to(device))


def run(device: torch.device, impl: str, dtype, smoke: bool) -> None:
    rows = []
    for num_requests in (1,) if smoke else (1, 4, 16):
        for length in (64,) if smoke else (512, 2048, 8192):
            cache = filled_cache(num_requests, length, dtype, device, impl)
            slots = list(range(num_requests))
            saved = [t.clone() for t in (cache.tables.block_tables, cache.tables.lengths,
                                         cache.tables.used_blocks)]

            def restore():
                for table, copy in zip((cache.tables.block_tables, cache.tables.lengths,
                                        cache.tables.used_blocks), saved):
                    table.copy_(copy)

            row = [num_requests * HEADS, length, length // 2]
            for merge in (False, True):
                selection = half_selection(num_requests * HEADS, length, merge, device)
                ms = median_ms(lambda: cache.compact(0, slots, selection), device,
                               repeats=5, before=restore)
                row += [ms, 1e3 * ms / (num_requests * HEADS * length)]
            rows.append(row)
    print_table(["streams", "length", "kept", "evict ms", "evict us/slot", "merge ms",
                 "merge us/slot"], rows)


def main() -> None:
    device, dtype, args = parse(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    print(f"{machine(device)}, dtype {dtype}, H={HEADS}, D={HEAD_DIM}, "
          f"block_size={BLOCK_SIZE}, one layer")
    for impl in ("triton", "torch") if triton_runs(device) else ("torch",):
        print(f"\n{impl}:")
        run(device, impl, dtype, args.smoke)


if __name__ == "__main__":
    main()
