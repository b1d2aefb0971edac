"""Scheduler-side accounting: a KV cache spec whose manager allocates by the compressed bound.

vLLM's full-attention manager gives a request ceil(tokens / block_size) pages. Ours gives
it what `CompressionSchedule` says the compressed streams can occupy (the whole context
until the first compression, then about budget + interval tokens), and frees the trailing
pages beyond that as soon as a step ends with less data. The worker compacts every
request's live head-blocks into its first pages, so trailing pages hold no live data when
they are released; the worker applies the same release rule to its copy of the block
table (runtime.py), so both sides agree on a request's live pages without exchanging
messages.

With prefix caching, a request's full pages written before its first compression (and the
cached pages it started from) are hashed as vLLM does and never written again: the first
compression copies the survivors into fresh pages (allocated for that step), and the next
step releases the full pages, which stay in vLLM's prefix cache for later requests.

Released pages become null entries in the request's block list (as sliding-window
attention does); new pages are appended. A page is never handed to another request while
it holds live data of the first: release happens only for pages past the bound, at the
start of a step, after the previous step's compaction ran.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

import torch

from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.cache.second_tier import row_format
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.policies.selection import LowBitTier
from vllm_kvcompress.vllm_plugin.metrics import pages_freed_counter
from vllm_kvcompress.vllm_plugin.request_settings import policy_for, server_settings


@dataclass(frozen=True, kw_only=True)
class CompressedAttentionSpec(FullAttentionSpec):
    """Full attention whose pages hold per-head compressed streams (private, unhashable)."""

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # The width of the worker's block table. A request's block list only grows (released
        # entries turn null), and a first compression with prefix caching holds the full
        # prompt pages and the compressed bound at once: up to twice the context's pages.
        return max_block_entries(max_len, self.block_size)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # What vLLM's start-up check asks of the cache: one max_model_len request must fit.
        # In chunked prefill mode a request holds its compressed bound plus one step's
        # tokens, so a prompt larger than the whole cache runs (Locret's setting).
        full = super().max_memory_usage_bytes(vllm_config)
        pages = chunked_peak_pages(server_settings(vllm_config), vllm_config, self.block_size,
                                   self.head_size, self.dtype)
        return full if pages is None else min(full, pages * self.page_size_bytes)


def chunked_peak_pages(settings: KVCompressConfig, vllm_config, block_size: int,
                       head_size: int, dtype: torch.dtype) -> int | None:
    """Most pages one request with `settings` holds in `chunked` prefill mode (steps of
    at most max_num_batched_tokens, up to max_model_len tokens); None in other modes."""
    if not settings.enabled or settings.kv_prefill_mode != "chunked":
        return None
    model_config = vllm_config.model_config
    num_layers = model_config.get_num_layers(vllm_config.parallel_config)
    schedule = schedule_for(settings, block_size, num_layers, False, head_size, dtype)
    return schedule.chunked_peak_pages(vllm_config.scheduler_config.max_num_batched_tokens,
                                       model_config.max_model_len)


class CompressedAttentionManager(FullAttentionManager):
    """Allocates and frees a request's pages by its CompressionSchedule.

    `schedules` is kept by the scheduler from a request's arrival to its end (None: the
    request is not compressed and behaves like full attention).
    """

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.schedules: dict[str, CompressionSchedule | None] = {}
        # request id -> (computed tokens at the start of this step, prompt length)
        self._step: dict[str, tuple[int, int]] = {}
        # request id -> tokens processed at its first compression since it (re)started
        self._compressed_at: dict[str, int] = {}
        self.pages_released = 0
        # Most tokens one step brings a request (vLLM's token budget; set by the scheduler).
        self.max_step_tokens = 1
        # request id -> prompt tokens it reads from a group's compressed prefix without a
        # page of its own for them (the prefix's pages hold fewer tokens than it stands for)
        self.prefix_reads: dict[str, int] = {}

    def compressed_at(self, request_id: str) -> int:
        """Tokens processed at the request's first compression since it (re)started; 0: none."""
        return self._compressed_at.get(request_id, 0)

    def num_live_pages(self, request_id: str) -> int:
        return sum(not block.is_null for block in self.req_to_blocks.get(request_id, ()))

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # Called first in every allocate_slots: remember the step's starting point and
        # release pages the streams no longer need after the previous step.
        self._step[request_id] = (processed_computed_tokens, num_prompt_tokens or 0)
        schedule = self.schedules.get(request_id)
        compressed_at = self._compressed_at.get(request_id)
        if schedule is None or compressed_at is None or request_id not in self.req_to_blocks:
            return
        blocks = self.req_to_blocks[request_id]
        released = release_leading_pages(blocks, schedule.shared_pages(compressed_at),
                                         self._null_block, self.block_pool)
        keep = schedule.pages_to_keep(processed_computed_tokens, num_prompt_tokens or 0,
                                      compressed_at)
        released += release_trailing_pages(blocks, keep, self._null_block, self.block_pool)
        if released:
            self.pages_released += released
            pages_freed_counter().inc(released)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        schedule = self.schedules.get(request_id)
        if schedule is None:
            saved = self.prefix_reads.get(request_id, 0)
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens - saved, new_computed_blocks,
                total_computed_tokens - saved, num_local_computed_tokens - saved,
                num_tokens_main_model - saved, apply_admission_cap, prefill_end)
        needed = self._pages_for_step(request_id, schedule, total_computed_tokens, num_tokens)
        if apply_admission_cap and schedule.prefill_mode == "chunked":
            # vLLM's admission asks for the whole sequence at once; in chunked mode the
            # request never holds more than its chunked bound.
            needed = min(needed, schedule.chunked_peak_pages(self.max_step_tokens, num_tokens))
        held = self.num_live_pages(request_id) + len(new_computed_blocks)
        # Cached pages nobody holds sit in the free queue: taking them uses free capacity.
        return max(needed - held, 0) + self._get_num_evictable_blocks(new_computed_blocks)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        schedule = self.schedules.get(request_id)
        if schedule is None:
            saved = self.prefix_reads.get(request_id, 0)
            return super().allocate_new_blocks(request_id, num_tokens - saved,
                                               num_tokens_main_model - saved)
        computed, prompt_len = self._step.get(request_id, (0, 0))
        needed = self._pages_for_step(request_id, schedule, computed, num_tokens)
        # This step is going to run: note the first compression it brings.
        if (request_id not in self._compressed_at
                and schedule.should_compress(num_tokens, 0, prompt_len)):
            self._compressed_at[request_id] = num_tokens
        missing = needed - self.num_live_pages(request_id)
        if missing <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(missing)
        self.req_to_blocks[request_id].extend(new_blocks)
        if self._record_new_block_ids:
            self.new_block_ids.extend(block.block_id for block in new_blocks)
        return new_blocks

    def add_local_computed_blocks(self, request_id, new_computed_blocks,
                                  num_local_computed_tokens, num_external_computed_tokens) -> None:
        saved = self.prefix_reads.get(request_id, 0)
        super().add_local_computed_blocks(request_id, new_computed_blocks,
                                          num_local_computed_tokens - saved,
                                          num_external_computed_tokens)

    def _pages_for_step(self, request_id: str, schedule: CompressionSchedule,
                        num_computed: int, num_tokens: int) -> int:
        prompt_len = self._step.get(request_id, (0, 0))[1]
        return schedule.pages_for_step(num_computed, num_tokens - num_computed, prompt_len,
                                       self._compressed_at.get(request_id, 0))

    def cache_blocks(self, request, num_tokens, retention_interval=None, *,
                     replay_boundaries) -> None:
        # Only pages still holding the tokens of their position may be hashed: those of
        # uncompressed requests, and a shared_prefix request's up to its first compression
        # (it never writes them afterwards).
        schedule = self.schedules.get(request.request_id)
        if schedule is not None and not schedule.shared_prefix:
            return
        if request.request_id in self.prefix_reads:   # its first pages hold compressed KV
            return
        num_tokens = min(num_tokens, self._compressed_at.get(request.request_id, num_tokens))
        super().cache_blocks(request, num_tokens, retention_interval,
                             replay_boundaries=replay_boundaries)

    def pop_blocks_for_free(self, request_id: str):
        # Freed on finish and on preemption; the schedule stays until the request ends.
        self._step.pop(request_id, None)
        self._compressed_at.pop(request_id, None)
        self.prefix_reads.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def max_block_entries(max_len: int, block_size: int) -> int:
    """Entries a compressed request's block list can reach: its context's pages twice (full
    pages kept for the prefix cache + the compressed copy), plus the one entry past
    ceil(tokens / block_size) that releases and re-appends around compressions leave."""
    return 2 * (-(-max_len // block_size)) + 2


def release_leading_pages(blocks: list, count: int, null_block, block_pool) -> int:
    """Null and free the live entries among the first `count` of `blocks` (the shared
    full pages a request has copied its survivors out of). Returns how many were freed.
    vLLM keeps freed hashed pages in its prefix cache until it needs the space."""
    freed = [block for block in blocks[:count] if not block.is_null]
    for i in range(min(count, len(blocks))):
        blocks[i] = null_block
    if freed:
        block_pool.free_blocks(reversed(freed))
    return len(freed)


def release_trailing_pages(blocks: list, keep: int, null_block, block_pool) -> int:
    """Null and free the live entries of `blocks` past the first `keep` live ones.

    Returns how many pages were freed. Entries keep their positions (the worker's block
    table only ever appends), so released ones become the null block.
    """
    live_positions = [i for i, block in enumerate(blocks) if not block.is_null]
    released = live_positions[keep:]
    if not released:
        return 0
    freed = [blocks[i] for i in reversed(released)]
    for i in released:
        blocks[i] = null_block
    block_pool.free_blocks(freed)
    return len(freed)


def register_spec() -> None:
    """Make the engine core build CompressedAttentionManager for our spec."""
    # The registry fills in vLLM's built-in specs only while it is empty: do that first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        CompressedAttentionSpec, CompressedAttentionManager,
        uniform_type_base_spec=CompressedAttentionSpec,
    )


def schedule_for(settings: KVCompressConfig, block_size: int, num_layers: int,
                 prefix_caching: bool, head_size: int,
                 dtype: torch.dtype) -> CompressionSchedule | None:
    """The compression schedule of a request with `settings` (None: not compressed), on
    head-blocks of block_size x head_size keys and values of `dtype`.

    With prefix caching on, a request shares its prefix unless its policy accumulates
    attention over every query (a cache hit would skip the queries of the cached tokens)
    or writes trained scores (cached pages may come from a request that wrote none)."""
    if not settings.enabled:
        return None
    policy = policy_for(settings)
    tier = policy.second_tier_for(settings.budget, head_size)
    tier_fields = {}
    if tier is not None:
        low_bit = isinstance(tier, LowBitTier)
        cell_bytes = 2 * block_size * head_size * dtype.itemsize
        tier_fields = dict(
            second_tier="low_bit" if low_bit else "narrow_key",
            tier_slots_per_block=row_format(tier, head_size, dtype).slots_per_block(cell_bytes),
            low_cap=tier.cap if low_bit else None,
            narrow_recent=0 if low_bit else policy.options["recent"])
    return CompressionSchedule(
        budget=settings.budget, interval=settings.kv_interval, block_size=block_size,
        prefill_mode=settings.kv_prefill_mode,
        layer_budget=policy.max_layer_budget(settings.budget, num_layers),
        shared_prefix=(prefix_caching and not policy.needs_accumulated
                       and policy.write_scorer is None),
        reread_tokens=policy.query_window if policy.needs_window_queries else 0,
        **tier_fields,
    )
