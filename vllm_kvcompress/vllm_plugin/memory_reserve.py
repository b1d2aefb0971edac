"""Memory the runtime takes beside vLLM's KV pages, known before vLLM sizes the cache.

On a GPU vLLM gives every free byte (up to gpu_memory_utilization) to KV pages after a
profiling run, while the runtime allocates its tables at the first step: without a
reserve that step runs out of memory. The sizes are measured, not restated: the runtime's
buffers are built on the meta device (shapes, no memory) and their bytes summed.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.vllm_plugin.runtime import COMPRESSION_WORKSPACE_BYTES, stream_buffers


def owned_bytes(root, exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors reachable from `root` (through attributes, lists, tuples and
    dicts) that own their memory, other than those in `exclude`; views count nothing."""
    seen, total, stack = {id(tensor) for tensor in exclude}, 0, [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += 0 if item._base is not None else item.numel() * item.element_size()
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total


def _kv_shape(vllm_config) -> tuple[int, int, int, int, torch.dtype]:
    """(layers, KV heads, head size, block size, dtype) of this worker's pages."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return (model.get_num_layers(parallel), model.get_num_kv_heads(parallel),
            model.get_head_size(), vllm_config.cache_config.block_size, model.dtype)


def runtime_bytes(vllm_config, num_pages: int) -> int:
    """Bytes the runtime of a worker with `num_pages` KV pages allocates beside them,
    its compression workspace included."""
    layers, heads, head_size, block_size, dtype = _kv_shape(vllm_config)
    kv = [torch.empty(num_pages, heads, block_size, 2 * head_size, dtype=dtype, device="meta")
          for _ in range(layers)]
    buffers = stream_buffers(vllm_config, kv, heads, head_size, block_size,
                             keys_transposed=False)
    return owned_bytes(buffers, exclude=kv) + COMPRESSION_WORKSPACE_BYTES


def kv_cache_bytes(vllm_config, available: int) -> int:
    """Of `available` bytes, those to give KV pages so that the pages and the runtime's
    buffers for that many pages fit together."""
    layers, heads, head_size, block_size, dtype = _kv_shape(vllm_config)
    page = layers * heads * block_size * 2 * head_size * dtype.itemsize
    one, two = runtime_bytes(vllm_config, 1), runtime_bytes(vllm_config, 2)
    per_page = two - one
    pages = max(0, (available - (one - per_page)) // (page + per_page))
    return pages * page
