"""vLLM's worker with the compressed attention backend and the runtime's step hooks."""

from __future__ import annotations

import time

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvcompress.vllm_plugin import runtime_registry

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level


class CPUCompressionWorker(CPUWorker):
    def load_model(self, *args, **kwargs) -> None:
        # Attention layers pick their backend while the model is built; the override is
        # scoped to that, so another engine in this process gets stock vLLM.
        # vLLM memoizes backend selection per process: forget it on both sides.
        register_backend(AttentionBackendEnum.CPU_ATTN,
                         "vllm_kvcompress.vllm_plugin.backend.CompressedCPUAttentionBackend")
        _cached_get_attn_backend.cache_clear()
        try:
            super().load_model(*args, **kwargs)
        finally:
            AttentionBackendEnum.CPU_ATTN.clear_override()
            _cached_get_attn_backend.cache_clear()

    def init_device(self) -> None:
        super().init_device()
        runtime_registry.set_runner(self.model_runner)

    def shutdown(self) -> None:
        super().shutdown()
        # The runtime holds views of the KV tensors: let them go with the engine.
        runtime_registry.set_runner(None)

    def execute_model(self, scheduler_output):
        runtime = runtime_registry.get()
        if runtime is not None:
            runtime.forget(scheduler_output.finished_req_ids)
            runtime.forget(scheduler_output.preempted_req_ids or ())
        started = time.perf_counter()
        output = super().execute_model(scheduler_output)
        runtime = runtime_registry.get()
        if runtime is not None:
            if scheduler_output.total_num_scheduled_tokens:
                runtime.metrics.add_step(time.perf_counter() - started)
            # Also after the step that only delivers the last finishes: gauges go idle.
            runtime.report()
        return output
