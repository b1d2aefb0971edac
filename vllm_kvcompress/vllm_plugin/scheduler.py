"""vLLM's scheduler with compressed-KV accounting (engine core process).

On top of the prefix-cache replacement and trace (prefix_cache.py) and batch scheduling
(batch_scheduler.py), only four things change: the KV manager of our spec learns each
request's compression schedule when the request arrives, prefix-cache hits leave a
compressed request the prompt tokens its policy must see the queries of, batch admission
reserves a compressed request's bound instead of its whole context, and a few counters
are kept for metrics and tests. Allocation itself stays vLLM's, through
CompressedAttentionManager.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_kvcompress.vllm_plugin.kv_cache_spec import (
    CompressedAttentionManager,
    register_spec,
    schedule_for,
)
from vllm_kvcompress.vllm_plugin.prefix_cache import PrefixCacheScheduler
from vllm_kvcompress.vllm_plugin.request_settings import (
    resolve_request_settings,
    server_settings,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level


class KVCompressScheduler(PrefixCacheScheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        register_spec()  # before super() builds the KV cache manager
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.settings = server_settings(vllm_config)
        self.compressed_manager = self._find_compressed_manager()
        self.compressed_manager.max_step_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.block_size = self.compressed_manager.block_size
        spec = self.compressed_manager.kv_cache_spec
        self.head_size, self.dtype = spec.head_size, spec.dtype
        self.num_layers = vllm_config.model_config.get_total_num_hidden_layers()
        self.prefix_caching = vllm_config.cache_config.enable_prefix_caching
        # Counters for tests and benchmarks.
        self.max_running = 0
        self.num_preemptions = 0

    def _find_compressed_manager(self) -> CompressedAttentionManager:
        managers = self.kv_cache_manager.coordinator.single_type_managers
        ours = [m for m in managers if isinstance(m, CompressedAttentionManager)]
        if len(managers) != 1 or len(ours) != 1:
            raise NotImplementedError(
                "KV compression needs every attention layer in one full-attention KV "
                f"cache group; this model has {len(managers)} group(s) "
                f"({', '.join(type(m).__name__ for m in managers)})"
            )
        return ours[0]

    def add_request(self, request) -> None:
        if request.request_id not in self.requests and request.sampling_params is not None:
            settings = resolve_request_settings(
                self.settings, request.sampling_params.extra_args, self.max_model_len,
                prompt_len=request.num_prompt_tokens)
            schedule = schedule_for(settings, self.block_size, self.num_layers,
                                    self.prefix_caching, self.head_size, self.dtype)
            self.compressed_manager.schedules[request.request_id] = schedule
            if schedule is not None and not schedule.shared_prefix:
                request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _get_local_prefix_cache_hit(self, request):
        blocks, num_hit, *rest = super()._get_local_prefix_cache_hit(request)
        schedule = self.compressed_manager.schedules.get(request.request_id)
        if schedule is None or num_hit == 0:
            return blocks, num_hit, *rest
        # Leave the policy's observation window to compute, whole pages at a time, so
        # that its scores see the same queries as without the cache.
        allowed = max(request.num_tokens - schedule.reread_tokens, 0)
        allowed -= allowed % self.block_size
        if num_hit > allowed:
            blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, allowed)
            num_hit = allowed
        return blocks, num_hit, *rest

    def peak_pages(self, request) -> int:
        schedule = self.compressed_manager.schedules.get(request.request_id)
        if schedule is None:
            return super().peak_pages(request)
        return schedule.peak_pages(request.num_prompt_tokens, self.final_len(request),
                                   request.num_computed_tokens,
                                   self.compressed_manager.compressed_at(request.request_id))

    def _free_request(self, request, *args, **kwargs):
        self.compressed_manager.schedules.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    def _preempt_request(self, request, *args, **kwargs) -> None:
        self.num_preemptions += 1
        super()._preempt_request(request, *args, **kwargs)

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        self.max_running = max(self.max_running, len(self.running))
        return output
