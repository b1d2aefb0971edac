"""The compressed attention backend on CUDA, registered as vLLM's CUSTOM backend.

The builder and the layer's forward are the CPU backend's (backend.py): the runtime they
drive attends with the Triton kernels on CUDA tensors (kernels/dispatch.py). This class
only tells vLLM's selector and KV cache allocator what those kernels accept.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, MultipleOf

from vllm_kvcompress.vllm_plugin.backend import CompressedBackend
from vllm_kvcompress.vllm_plugin.engine_setup import BLOCK_SIZE


class CompressedCUDAAttentionBackend(CompressedBackend, AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    # Pages hold the model's dtype; low-bit keys are the plugin's own tier.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(BLOCK_SIZE)]
