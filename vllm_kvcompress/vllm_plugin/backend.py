"""The attention backend: per-head paged streams over vLLM's KV tensors.

It asks vLLM for the LBHNC layout ([pages, H, block_size, 2 * head_size] per layer, K then
V inside each (page, head) cell), which is exactly a pool of head-blocks, so memory sizing
and allocation stay vLLM's. What changes: the metadata builder plans the step with the
worker's CompressionRuntime, and forward writes K/V, attends and compresses through it.
The platform backends (CPU here, CUDA in gpu_backend.py) differ only in what vLLM checks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import KVCacheLayout

from vllm_kvcompress.vllm_plugin import runtime_registry
from vllm_kvcompress.vllm_plugin.kv_cache_spec import CompressedAttentionSpec
from vllm_kvcompress.vllm_plugin.runtime import CompressionRuntime, StepPlan


class CompressedBackend:
    """What every platform's compressed backend declares (mixed in before vLLM's class)."""

    forward_includes_kv_cache_update: ClassVar[bool] = True

    @staticmethod
    def get_impl_cls() -> type[CompressedAttentionImpl]:
        return CompressedAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CompressedAttentionMetadataBuilder]:
        return CompressedAttentionMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Head-major pages: block b's head h is head-block b * H + h of one flat pool.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec):
        # The engine core builds our manager from this spec type (kv_cache_spec.py).
        fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
        return CompressedAttentionSpec(**fields)


class CompressedCPUAttentionBackend(CompressedBackend, CPUAttentionBackend):
    """Replaces CPU_ATTN when compression is on (registered by the CPU worker)."""


class CompressedAttentionMetadataBuilder(AttentionMetadataBuilder[StepPlan]):
    # The step's tables change every step and attention runs eagerly: on CUDA, vLLM then
    # captures graphs only for the pieces between attention layers (PIECEWISE).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.kv_cache_spec = kv_cache_spec
        self.vllm_config = vllm_config

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> StepPlan:
        runtime = runtime_registry.get() or self._create_runtime()
        return runtime.plan_step(common_attn_metadata.num_reqs,
                                 common_attn_metadata.query_start_loc_cpu)

    def _create_runtime(self) -> CompressionRuntime:
        layers = get_layers_from_vllm_config(self.vllm_config, Attention, self.layer_names)
        ordered = sorted(layers.values(), key=lambda layer: extract_layer_index(layer.layer_name))
        kv_caches = [layer.kv_cache for layer in ordered]
        for index, layer in enumerate(ordered):
            layer.impl.layer_index = index
        spec = self.kv_cache_spec
        # Built during a step (inside inference mode), used between steps too: its tables
        # must be normal tensors, which inference mode may still update in place.
        with torch.inference_mode(False):
            runtime = CompressionRuntime(self.vllm_config, runtime_registry.runner(), kv_caches,
                                         spec.num_kv_heads, spec.head_size, spec.block_size)
        runtime_registry.set(runtime)
        return runtime


class CompressedAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None) -> None:
        unsupported = [name for name, value in (
            ("alibi slopes", alibi_slopes), ("sliding window", sliding_window),
            ("logits soft cap", logits_soft_cap), ("attention sinks", sinks),
            ("cross-layer KV sharing", kv_sharing_target_layer_name)) if value]
        if kv_cache_dtype != "auto":
            unsupported.append(f"kv_cache_dtype={kv_cache_dtype}")
        if unsupported:
            raise NotImplementedError(
                f"vllm-kvcompress attention does not support {', '.join(unsupported)} yet")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.layer_index: int | None = None  # set when the runtime binds the layers

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: StepPlan | None, output: torch.Tensor,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if attn_metadata is None:  # profiling / warm-up run without requests
            return output
        runtime_registry.get().forward(self.layer_index, query, key, value, attn_metadata,
                                       self.scale, output)
        return output
