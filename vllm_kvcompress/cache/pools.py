"""The storage of one layer: a KV pool of head-blocks and the per-slot metadata next to it.

Head-block hb = page * H + kv_head holds block_size slots of one KV head:
  kv         [num_pages * H, 2, block_size, D]  kv[hb, 0] keys, kv[hb, 1] values
  positions  [num_pages * H, block_size] int32  original token position of each slot
  scores     [num_pages * H, block_size] float32  accumulated attention of each slot
Inside vLLM `kv` is a view of vLLM's per-layer KV tensor (any strides); the metadata pools
are always the cache's own.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class LayerPools(NamedTuple):
    kv: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor


def create_layer_pools(num_layers: int, num_head_blocks: int, block_size: int, head_size: int,
                       dtype: torch.dtype, device: torch.device | str,
                       kv_pools: Sequence[torch.Tensor] | None = None) -> list[LayerPools]:
    """One LayerPools per layer, over `kv_pools` when given (checked), else fresh zeros."""
    shape = (num_head_blocks, 2, block_size, head_size)
    if kv_pools is None:
        kv_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    elif len(kv_pools) != num_layers:
        raise ValueError(f"{len(kv_pools)} KV pools given for {num_layers} layers")
    device = torch.device(device)
    for layer, kv in enumerate(kv_pools):
        on_device = kv.device.type == device.type and device.index in (None, kv.device.index)
        if tuple(kv.shape) != shape or kv.dtype != dtype or not on_device:
            raise ValueError(f"KV pool of layer {layer}: {tuple(kv.shape)} {kv.dtype} on "
                             f"{kv.device}, expected {shape} {dtype} on {device}")
    return [LayerPools(kv=kv,
                       positions=torch.full((num_head_blocks, block_size), -1, dtype=torch.int32,
                                            device=device),
                       scores=torch.zeros((num_head_blocks, block_size), dtype=torch.float32,
                                          device=device))
            for kv in kv_pools]
