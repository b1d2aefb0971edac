"""The storage of one layer: KV pools of head-blocks and the per-slot metadata next to them.

Head-block hb = page * H + kv_head holds block_size slots of one KV head:
  keys       [num_pages * H, block_size, D]  key of each slot
  values     [num_pages * H, block_size, D]  value of each slot
  positions  [num_pages * H, block_size] int32  original token position of each slot
  scores     [num_pages * H, block_size] float32  accumulated attention of each slot
Inside vLLM `keys` and `values` are views of vLLM's per-layer KV tensor with whatever strides
its attention kernel wants (on CPU keys are stored transposed in each block); the metadata
pools are always the cache's own. The same memory read as bytes per head-block
(`head_block_cells`) holds the rows of second-tier head-blocks (second_tier.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class LayerPools(NamedTuple):
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor


def fresh_head_blocks(num_layers: int, num_head_blocks: int, block_size: int, head_size: int,
                      dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """Zeroed KV memory of L layers, [num_head_blocks, 2, block_size, head_size] each (a
    head-block's keys, then its values)."""
    return [torch.zeros((num_head_blocks, 2, block_size, head_size), dtype=dtype, device=device)
            for _ in range(num_layers)]


def head_block_pools(kv_cache: torch.Tensor, block_size: int, head_size: int,
                     keys_transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) views [pages * H, block_size, D] of one layer's vLLM KV cache
    [pages, H, block_size, 2 * D] (vLLM's LBHNC layout; the plugin owns what a cell holds:
    block_size keys, then block_size values); keys_transposed stores each cell's keys as
    [D, block_size], as vLLM's CPU kernel reads them."""
    values = kv_cache.view(-1, 2, block_size, head_size)[:, 1]
    if keys_transposed:
        keys = kv_cache.view(-1, 2, head_size, block_size)[:, 0].transpose(1, 2)
    else:
        keys = kv_cache.view(-1, 2, block_size, head_size)[:, 0]
    return keys, values


def head_block_cells(kv_memory: torch.Tensor, num_head_blocks: int) -> torch.Tensor:
    """[num_head_blocks, cell_bytes] uint8: a layer's contiguous KV memory (any shape and
    dtype, head-block-major) as raw bytes per head-block, for the low-bit tier's rows."""
    return kv_memory.view(torch.uint8).view(num_head_blocks, -1)


def create_layer_pools(num_layers: int, num_head_blocks: int, block_size: int, head_size: int,
                       dtype: torch.dtype, device: torch.device | str,
                       kv_pools: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[LayerPools]:
    """One LayerPools per layer over `kv_pools` ((keys, values) per layer), checked."""
    shape = (num_head_blocks, block_size, head_size)
    if len(kv_pools) != num_layers:
        raise ValueError(f"{len(kv_pools)} KV pools given for {num_layers} layers")
    device = torch.device(device)
    for layer, pair in enumerate(kv_pools):
        for name, pool in zip(("keys", "values"), pair):
            on_device = (pool.device.type == device.type
                         and device.index in (None, pool.device.index))
            if tuple(pool.shape) != shape or pool.dtype != dtype or not on_device:
                raise ValueError(f"{name} pool of layer {layer}: {tuple(pool.shape)} "
                                 f"{pool.dtype} on {pool.device}, expected {shape} {dtype} "
                                 f"on {device}")
    return [LayerPools(keys=keys, values=values,
                       positions=torch.full((num_head_blocks, block_size), -1, dtype=torch.int32,
                                            device=device),
                       scores=torch.zeros((num_head_blocks, block_size), dtype=torch.float32,
                                          device=device))
            for keys, values in kv_pools]
