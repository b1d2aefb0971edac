"""vLLM's scheduler with compressed-KV accounting (engine core process).

On top of the prefix-cache replacement and trace (prefix_cache.py) and batch scheduling
(batch_scheduler.py), only these things change: the KV manager of our spec learns each
request's compression schedule when the request arrives, prefix-cache hits leave a
compressed request the prompt tokens its policy must see the queries of, batch admission
reserves a compressed request's bound instead of its whole context, a group's leader
leaves its compressed prefix for the members (sharing/group_prefix.py: a prefix-cache
lookup of a member answers with those pages), and a few counters are kept for metrics
and tests. Allocation itself stays vLLM's, through
CompressedAttentionManager.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from vllm.logger import init_logger

from vllm_kvcompress.sharing.batch_scheduling import Candidate
from vllm_kvcompress.sharing.group_prefix import (
    READS_GROUP_PREFIX,
    GroupPrefix,
    is_leader,
    kept_tokens,
)
from vllm_kvcompress.vllm_plugin.batch_scheduler import request_group
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
        # Groups' compressed prefixes (sharing/group_prefix.py), and groups whose leader
        # has not ended yet (their members wait for it).
        self.group_prefixes: dict[Hashable, GroupPrefix] = {}
        self.pending_leaders: Counter = Counter()
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
            if is_leader(request.sampling_params.extra_args):
                self.pending_leaders[request_group(request)] += 1
        super().add_request(request)

    def _get_local_prefix_cache_hit(self, request):
        blocks, num_hit, *rest = super()._get_local_prefix_cache_hit(request)
        prefix = self._group_prefix_read(request)
        if prefix is not None:
            self.compressed_manager.prefix_reads[request.request_id] = prefix.saved_tokens
            request.sampling_params.extra_args[READS_GROUP_PREFIX] = True
            blocks = self.kv_cache_manager.create_kv_cache_blocks((list(prefix.pages),))
            return blocks, prefix.prefix_len, *rest
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
        saved = self.compressed_manager.prefix_reads.get(request.request_id)
        if schedule is None and saved is not None:
            return -(-(self.final_len(request) - saved) // self.block_size)
        if schedule is None:
            return super().peak_pages(request)
        return schedule.peak_pages(request.num_prompt_tokens, self.final_len(request),
                                   request.num_computed_tokens,
                                   self.compressed_manager.compressed_at(request.request_id))

    def _group_prefix_read(self, request) -> GroupPrefix | None:
        """The group prefix an uncompressed member starts on, if its prompt begins with it."""
        prefix = self.group_prefixes.get(request_group(request))
        if (prefix is None or is_leader(request.sampling_params.extra_args)
                or self.compressed_manager.schedules.get(request.request_id) is not None):
            return None
        return prefix if prefix.covers(request.block_hashes, request.num_tokens) else None

    def admission_candidate(self, request) -> Candidate:
        prefix = self._group_prefix_read(request)
        if prefix is None:
            return super().admission_candidate(request)
        # The prefix's pages are held by the group: only the member's own tokens cost.
        return Candidate([], -(-(self.final_len(request) - prefix.prefix_len) // self.block_size))

    def waits_for_leader(self, request) -> bool:
        group = request_group(request)
        return (group is not None and self.pending_leaders[group] > 0
                and not is_leader(request.sampling_params.extra_args))

    def holds_pages_of(self, group) -> bool:
        return group not in self.group_prefixes   # members read the compressed prefix

    def _free_request(self, request, *args, **kwargs):
        group = request_group(request)
        if is_leader(request.sampling_params.extra_args):
            self._keep_group_prefix(request, group)
        self.compressed_manager.schedules.pop(request.request_id, None)
        result = super()._free_request(request, *args, **kwargs)
        if group in self.group_prefixes and group not in self.members.readers:
            self.release_held(self.group_prefixes.pop(group).pages)   # the group has ended
        return result

    def _keep_group_prefix(self, request, group) -> None:
        """A leader ends: hold the pages of its streams for its group's members (finished
        or aborted once its prompt was in; the worker keeps their tables by the same rule)."""
        self.pending_leaders[group] -= 1
        if not self.pending_leaders[group]:
            del self.pending_leaders[group]
        manager, request_id = self.compressed_manager, request.request_id
        schedule = manager.schedules.get(request_id)
        compressed_at = manager.compressed_at(request_id)
        tokens = kept_tokens(request.num_prompt_tokens, schedule and schedule.budget,
                             compressed_at > 0, self.block_size)
        if request.num_computed_tokens < request.num_prompt_tokens:
            return      # aborted before its prompt was in: its members compute the prefix
        if tokens is None or not self.prefix_caching:
            logger.warning("vllm-kvcompress: the prefix of group %r is not kept (its leader "
                           "needs a whole prompt of full pages, a budget that fills pages, and "
                           "prefix caching on)", group)
            return
        leading = schedule.shared_pages(compressed_at) if schedule and compressed_at else 0
        pages = [block for block in self.request_blocks(request_id)[leading:]
                 if not block.is_null][: tokens // self.block_size]
        old = self.group_prefixes.pop(group, None)
        if old is not None:
            self.release_held(old.pages)
        self.kv_cache_manager.block_pool.touch(pages)
        self.group_prefixes[group] = GroupPrefix(
            pages, request.num_prompt_tokens, tokens,
            list(request.block_hashes[: request.num_prompt_tokens // self.block_size]))

    def _preempt_request(self, request, *args, **kwargs) -> None:
        self.num_preemptions += 1
        super()._preempt_request(request, *args, **kwargs)

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        self.max_running = max(self.max_running, len(self.running))
        return output
