"""Turn compression on in a freshly built VllmConfig.

Everything else follows from the config, which reaches every vLLM process: the scheduler
class (engine core) registers our KV cache spec and manager, the worker class (workers)
swaps in the attention backend before the model is built.
"""

from __future__ import annotations

import os

import vllm.envs as envs
from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.vllm_plugin.request_settings import check_scorer_model

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level

# Tokens per head-block and per page: small enough that a 256-token budget wastes at most
# one partly filled block in eight, a multiple of 32 as vLLM's CPU kernels expect.
BLOCK_SIZE = 32

SCHEDULER_CLS = "vllm_kvcompress.vllm_plugin.scheduler.KVCompressScheduler"
# Prefix-cache replacement or tracing without compression: vLLM's worker stays.
PREFIX_CACHE_SCHEDULER_CLS = "vllm_kvcompress.vllm_plugin.prefix_cache.PrefixCacheScheduler"
# vLLM's worker class per platform -> ours, which wraps it.
CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"
WORKER_CLS = {
    CPU_WORKER: "vllm_kvcompress.vllm_plugin.worker.CPUCompressionWorker",
    GPU_WORKER: "vllm_kvcompress.vllm_plugin.gpu_worker.GPUCompressionWorker",
}
# The runtime reads the V1 model runner's state (input_batch, requests); vLLM picks V2 on
# CUDA unless this says 0 before the workers start.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def prepare_engine_args(engine_args) -> None:
    """Before vLLM builds its config: refuse a forced V2 model runner or full CUDA graphs,
    then ask for the V1 runner and piecewise graphs (attention runs eagerly between the
    captured pieces, reading tables that change every step)."""
    problems = []
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        problems.append(f"{V2_RUNNER_ENV}=1 (the plugin drives the V1 model runner; unset it)")
    compilation = engine_args.compilation_config
    mode = (compilation.get("cudagraph_mode") if isinstance(compilation, dict)
            else compilation.cudagraph_mode)
    if isinstance(mode, str):
        mode = CUDAGraphMode.__members__.get(mode.upper())  # vLLM reports unknown names
    if mode is not None and mode.has_full_cudagraphs():
        problems.append(f"cudagraph_mode={mode.name} (attention over compressed pages runs "
                        "outside CUDA graphs: use PIECEWISE or NONE)")
    if problems:
        raise KVCompressConfigError("KV compression cannot run with " + "; ".join(problems))
    os.environ[V2_RUNNER_ENV] = "0"
    if mode is None and current_platform.is_cuda():
        if isinstance(compilation, dict):
            compilation["cudagraph_mode"] = CUDAGraphMode.PIECEWISE
        else:
            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE


def enable_compression(vllm_config: VllmConfig, settings: KVCompressConfig,
                       prefix_caching_requested: bool | None = None) -> None:
    """Point vLLM at our scheduler and worker; refuse combinations we cannot run."""
    chunked = settings.kv_prefill_mode == "chunked"
    _refuse_unsupported(vllm_config, prefix_caching_requested and chunked)
    cache_config = vllm_config.cache_config
    cache_config.block_size = BLOCK_SIZE
    if cache_config.enable_prefix_caching and chunked:
        logger.info("vllm-kvcompress: prefix caching is turned off with --kv-prefill-mode "
                    "chunked (a prompt's pages are compressed before the prompt is complete)")
        cache_config.enable_prefix_caching = False
    # Both sides of the page accounting assume each step sees the previous one finished.
    vllm_config.scheduler_config.async_scheduling = False
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER_CLS
    parallel_config = vllm_config.parallel_config
    if parallel_config.worker_cls == GPU_WORKER:
        # Registered by the GPU worker: only the layers it builds get compressed attention.
        vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
    parallel_config.worker_cls = WORKER_CLS[parallel_config.worker_cls]
    _check_replacement(vllm_config, settings)
    check_scorer_model(settings, vllm_config.model_config.hf_config)
    logger.info("vllm-kvcompress: %s, budget %d tokens per KV head, interval %d, prefill %s",
                settings.kv_policy, settings.budget, settings.kv_interval,
                settings.kv_prefill_mode)


def enable_prefix_cache_plugin(vllm_config: VllmConfig, settings: KVCompressConfig) -> None:
    """Compression off, prefix-cache replacement, tracing or batch scheduling on: only the
    scheduler changes."""
    _check_replacement(vllm_config, settings)
    # Bits and lookups are matched to requests between steps; one step at a time.
    vllm_config.scheduler_config.async_scheduling = False
    vllm_config.scheduler_config.scheduler_cls = PREFIX_CACHE_SCHEDULER_CLS
    logger.info("vllm-kvcompress: prefix-cache replacement %s, %s scheduling%s",
                settings.kv_cache_replacement, settings.kv_scheduling,
                f", tracing lookups to {settings.kv_trace}" if settings.kv_trace else "")


def _check_replacement(vllm_config: VllmConfig, settings: KVCompressConfig) -> None:
    if settings.needs_prefix_cache and not vllm_config.cache_config.enable_prefix_caching:
        flag = ("--kv-trace" if settings.kv_cache_replacement == "lru"
                else f"--kv-cache-replacement={settings.kv_cache_replacement}")
        raise KVCompressConfigError(f"{flag}: needs prefix caching, which is off "
                                    "(drop --no-enable-prefix-caching)")


def _refuse_unsupported(vllm_config: VllmConfig, prefix_caching_requested: bool | None) -> None:
    model_config = vllm_config.model_config
    problems = []
    if prefix_caching_requested:
        problems.append("--enable-prefix-caching with --kv-prefill-mode chunked (chunks are "
                        "compressed before the prompt's pages could be shared; use the "
                        "full prefill mode)")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding")
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV connectors (--kv-transfer-config)")
    if model_config.is_encoder_decoder or model_config.use_mla or model_config.is_hybrid:
        problems.append("this model's attention (needs a decoder with standard "
                        "multi-head/grouped-query attention)")
    if model_config.get_sliding_window() is not None:
        problems.append("sliding-window attention layers")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype} (pages hold "
                        "the model's dtype; the low-bit tier is the plugin's own)")
    if vllm_config.parallel_config.worker_cls not in WORKER_CLS:
        problems.append(f"the worker {vllm_config.parallel_config.worker_cls} (supported: "
                        "vLLM's CPU and GPU workers)")
    backend = vllm_config.attention_config.backend
    ours = (AttentionBackendEnum.CUSTOM if vllm_config.parallel_config.worker_cls == GPU_WORKER
            else AttentionBackendEnum.CPU_ATTN)
    if backend not in (None, ours):
        problems.append(f"--attention-backend {backend.name} (compressed pages are read "
                        "by the plugin's own attention)")
    graphs = vllm_config.compilation_config.cudagraph_mode
    if vllm_config.parallel_config.worker_cls == GPU_WORKER and graphs.has_full_cudagraphs():
        problems.append(f"cudagraph_mode={graphs.name} (use PIECEWISE or NONE)")
    if problems:
        raise KVCompressConfigError(
            "KV compression cannot run with " + "; ".join(problems))
