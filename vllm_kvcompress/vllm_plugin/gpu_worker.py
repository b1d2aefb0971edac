"""vLLM's GPU worker (V1 model runner) with compressed attention.

The shared hooks are CompressionWorker's (worker.py). What the GPU adds: vLLM sizes the
KV cache from free memory after a profiling run, before the runtime exists, so the
worker reports that free memory less what the runtime will take (memory_reserve.py).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.worker.gpu_worker import Worker

from vllm_kvcompress.vllm_plugin.memory_reserve import kv_cache_bytes
from vllm_kvcompress.vllm_plugin.worker import CompressionWorker

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level


class GPUCompressionWorker(CompressionWorker, Worker):
    # CUSTOM, not FLASH_ATTN: a refused override must not fall through to a dense backend
    # that would read compressed pages as a request's whole context.
    backend_slot = AttentionBackendEnum.CUSTOM
    backend_cls = "vllm_kvcompress.vllm_plugin.gpu_backend.CompressedCUDAAttentionBackend"

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        kept = kv_cache_bytes(self.vllm_config, available)
        logger.info("vllm-kvcompress: %.2f GiB of %.2f GiB free go to KV pages, the rest "
                    "to stream tables, the query window and the compression workspace",
                    kept / 2**30, available / 2**30)
        return kept
