"""vLLM's workers with the compressed attention backend and the runtime's step hooks.

CompressionWorker holds what every platform shares; CPUCompressionWorker here and
GPUCompressionWorker (gpu_worker.py) put it in front of vLLM's worker for their platform.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import _cached_get_attn_backend
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvcompress.vllm_plugin import runtime_registry
from vllm_kvcompress.vllm_plugin.device_clock import DeviceClock

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level


class CompressionWorker:
    """Mixed in before a vLLM worker class: `backend_cls` attends for the layers this
    worker builds (registered under `backend_slot`), the runtime's hooks run per step."""

    backend_slot: ClassVar[AttentionBackendEnum]
    backend_cls: ClassVar[str]

    def load_model(self, *args, **kwargs) -> None:
        # Attention layers pick their backend while the model is built; the override is
        # scoped to that, so another engine in this process gets stock vLLM.
        # vLLM memoizes backend selection per process: forget it on both sides.
        register_backend(self.backend_slot, self.backend_cls)
        _cached_get_attn_backend.cache_clear()
        try:
            super().load_model(*args, **kwargs)
        finally:
            self.backend_slot.clear_override()
            _cached_get_attn_backend.cache_clear()

    def init_device(self) -> None:
        super().init_device()
        runtime_registry.set_runner(self.model_runner)
        self.step_clock = DeviceClock(self.model_runner.device)

    def shutdown(self) -> None:
        super().shutdown()
        # The runtime holds views of the KV tensors: let them go with the engine.
        runtime_registry.set_runner(None)

    def execute_model(self, scheduler_output):
        runtime = runtime_registry.get()
        if runtime is not None:
            runtime.end(scheduler_output.finished_req_ids)
            runtime.forget(scheduler_output.preempted_req_ids or ())
        started = self.step_clock.start()
        output = super().execute_model(scheduler_output)
        runtime = runtime_registry.get()
        if runtime is not None:
            if scheduler_output.total_num_scheduled_tokens:
                self.step_clock.stop(started, runtime.metrics.add_step)
            self.step_clock.collect()
            # Also after the step that only delivers the last finishes: gauges go idle.
            runtime.report()
        return output


class CPUCompressionWorker(CompressionWorker, CPUWorker):
    backend_slot = AttentionBackendEnum.CPU_ATTN
    backend_cls = "vllm_kvcompress.vllm_plugin.backend.CompressedCPUAttentionBackend"
