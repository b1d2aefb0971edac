"""Random per-head paged layouts for kernel tests, with a dense copy of every stream.

Head-blocks are handed out in a random order, so a stream's blocks are scattered over the
pool; the dense copy is what the plain-math oracles read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Where the Triton-vs-reference cases run: compiled on a GPU, interpreted otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class PagedStreams:
    key_pool: torch.Tensor         # [NB, bs, D]
    value_pool: torch.Tensor       # [NB, bs, D]
    scores_pool: torch.Tensor      # [NB, bs] float32, random prior scores
    block_tables: torch.Tensor     # [S, H, MB] int32
    lengths: torch.Tensor          # [S, H] int32
    request_slots: torch.Tensor    # [R] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    query: torch.Tensor            # [tokens, Hq, D]
    dense_keys: list               # [R][H] -> [len, D] float64
    dense_values: list
    stream_slots: list             # [R][H] -> [len] flat slot ids


def random_paged_streams(seed: int, query_lens: list[int], lengths: list[list[int]],
                         num_kv_heads: int, group: int, head_dim: int, block_size: int,
                         dtype: torch.dtype = torch.float32, device: str = "cpu",
                         spare_slots: int = 2) -> PagedStreams:
    """lengths[r][h] includes the query_lens[r] tokens of this step."""
    gen = torch.Generator().manual_seed(seed)
    num_requests = len(query_lens)
    blocks_of = [[-(-n // block_size) for n in row] for row in lengths]
    num_blocks = sum(map(sum, blocks_of)) + 3
    max_blocks = max([b for row in blocks_of for b in row] + [1])
    num_slots = num_requests + spare_slots
    kv_pool = torch.randn(num_blocks, 2, block_size, head_dim, generator=gen).to(dtype)
    scores_pool = torch.rand(num_blocks, block_size, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    request_slots = torch.randperm(num_slots, generator=gen)[:num_requests]
    block_tables = torch.randint(0, num_blocks, (num_slots, num_kv_heads, max_blocks),
                                 generator=gen, dtype=torch.int32)
    table_lengths = torch.randint(0, 5, (num_slots, num_kv_heads), generator=gen,
                                  dtype=torch.int32)
    dense_keys, dense_values, stream_slots = [], [], []
    for r in range(num_requests):
        slot = int(request_slots[r])
        keys_row, values_row, slots_row = [], [], []
        for h in range(num_kv_heads):
            blocks = [order.pop() for _ in range(blocks_of[r][h])]
            block_tables[slot, h, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            table_lengths[slot, h] = lengths[r][h]
            flat = [b * block_size + o for b in blocks for o in range(block_size)]
            flat = torch.tensor(flat[:lengths[r][h]], dtype=torch.int64)
            keys_row.append(kv_pool[flat // block_size, 0, flat % block_size].double())
            values_row.append(kv_pool[flat // block_size, 1, flat % block_size].double())
            slots_row.append(flat)
        dense_keys.append(keys_row)
        dense_values.append(values_row)
        stream_slots.append(slots_row)
    # Slots no stream uses hold NaN: kernels must never let them into a result.
    unused = torch.ones(num_blocks * block_size, dtype=torch.bool)
    for row in stream_slots:
        for flat in row:
            unused[flat] = False
    dead = unused.nonzero().squeeze(1)
    kv_pool[dead // block_size, :, dead % block_size] = float("nan")
    qsl = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    kv_pool = kv_pool.to(device)
    return PagedStreams(kv_pool[:, 0], kv_pool[:, 1], scores_pool.to(device),
                        block_tables.to(device), table_lengths.to(device),
                        request_slots.to(device), qsl.to(device), query.to(device), dense_keys,
                        dense_values, stream_slots)
