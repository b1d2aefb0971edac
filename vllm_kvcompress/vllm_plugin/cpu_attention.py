"""vLLM's own CPU attention kernel, run over per-head streams.

vLLM's CPU KV cache is [pages, H, block_size, 2 * D] per layer: each (page, KV head) cell
holds block_size keys, then block_size values. Its portable kernel (ISA "vec") stores the
keys of a cell transposed ([D, block_size]) and the values row-major. A head-block pool is
that cache with one KV head per cell, so every stream (request, KV head) can be one of the
kernel's sequences, with the G query heads of its group: one call attends over all streams
of a step, in place, at stock vLLM's speed. The torch path (kernels/paged_attention.py)
stays for steps that need each slot's attention probabilities (h2o and other accumulated-
attention policies), reading the same transposed keys through a strided view.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import vllm.envs as envs
from vllm import _custom_ops as ops

# The one ISA whose cache layout this module writes; compiled into every x86 build.
ISA = "vec"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def native_attention_supported(dtype: torch.dtype, head_size: int, block_size: int) -> bool:
    """True when vLLM's "vec" kernel can attend this model's streams on this machine."""
    return (platform.machine().lower() in ("x86_64", "amd64") and dtype in SUPPORTED_DTYPES
            and head_size % 32 == 0 and block_size % 32 == 0
            and hasattr(torch.ops._C, "cpu_attention_with_kv_cache"))


@dataclass
class NativeStep:
    """The kernel's view of one step's R requests as H * R streams, KV-head-major (stream
    (h, r) is row h * R + r): query_starts [H * R + 1] int32 offsets into the head-major
    query (see `NativeCPUAttention.forward`); seq_lens [L, H * R] int32 and block_tables
    [L, H * R, max_blocks] int32 per layer."""

    query_starts: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor


class NativeCPUAttention:
    """Attention of one step's queries over per-head streams with vLLM's CPU kernel.

    kv_caches: the L per-layer vLLM KV tensors [pages, H, block_size, 2 * D], keys stored
    as cache/pools.head_block_pools(..., keys_transposed=True) writes them.
    """

    def __init__(self, kv_caches: list[torch.Tensor], num_heads: int, num_kv_heads: int,
                 head_size: int, block_size: int):
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.group = num_heads // num_kv_heads
        self.dtype = kv_caches[0].dtype
        # The kernel's view: one KV head per head-block, keys then values inside it.
        self.caches = [kv.view(-1, 1, 2 * block_size, head_size).chunk(2, dim=2)
                       for kv in kv_caches]

    def plan(self, query_start_loc: torch.Tensor, num_tokens: int, block_tables: torch.Tensor,
             lengths: torch.Tensor, request_slots: torch.Tensor) -> NativeStep:
        """Once per step, after the step's tokens were appended: query_start_loc [R + 1]
        (host) and its last entry num_tokens, the cache's block_tables [L, S, H, max_blocks]
        and lengths [L, S, H], request_slots [R]. Compressing a layer later in the step
        changes only that layer's tables, after it attended."""
        heads = torch.arange(self.num_kv_heads, dtype=torch.int32)[:, None] * num_tokens
        starts = (heads + query_start_loc[None, :-1].to(torch.int32)).flatten()
        query_starts = torch.cat([starts, torch.tensor([self.num_kv_heads * num_tokens],
                                                       dtype=torch.int32)])
        num_layers, max_blocks = block_tables.shape[0], block_tables.shape[-1]
        return NativeStep(
            query_starts=query_starts,
            seq_lens=lengths[:, request_slots].transpose(1, 2).reshape(num_layers, -1),
            block_tables=block_tables[:, request_slots].transpose(1, 2).reshape(
                num_layers, -1, max_blocks))

    def forward(self, layer: int, query: torch.Tensor, step: NativeStep,
                scale: float) -> torch.Tensor:
        """Attention [tokens, Hq, D] of this step's queries [tokens, Hq, D] (request-major,
        each request's queries the last ones of its streams)."""
        num_tokens = query.shape[0]
        heads, group, dim = self.num_kv_heads, self.group, self.head_size
        stream_query = (query.view(num_tokens, heads, group, dim).transpose(0, 1)
                        .contiguous().view(heads * num_tokens, group, dim))
        seq_lens = step.seq_lens[layer]
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seq_lens), num_heads=group, num_kv_heads=1, head_dim=dim,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=step.query_starts,
            causal=True, sliding_window_size=-1, isa=ISA,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
        key_cache, value_cache = self.caches[layer]
        output = torch.empty_like(stream_query)
        ops.cpu_attention_with_kv_cache(
            query=stream_query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=step.query_starts, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=step.block_tables[layer],
            softcap=0.0, scheduler_metadata=metadata, s_aux=None)
        return output.view(heads, num_tokens, group, dim).transpose(0, 1).reshape(
            num_tokens, heads * group, dim)
