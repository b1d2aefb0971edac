"""Worker-side compression state: every request's streams over vLLM's KV tensors.

One CompressionRuntime per worker process. Per step, `plan_step` (called by the attention
metadata builder) brings each request's page list in line with the scheduler's, makes room
for the step's tokens in every stream and decides which requests compress after this step;
then each attention layer calls `forward`, which writes the layer's new K/V, attends over
the per-head tables and compresses the layer's streams that are due.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.logger import init_logger

from vllm_kvcompress.cache.device_copy import host_to_device
from vllm_kvcompress.cache.paged_stream_cache import PagedStreamCache
from vllm_kvcompress.cache.pools import head_block_pools
from vllm_kvcompress.cache.query_window import QueryWindow, WindowWrites
from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.kernels.dispatch import requested_impl
from vllm_kvcompress.policies import Policy, StreamBatch
from vllm_kvcompress.policies.budgets import attention_density
from vllm_kvcompress.policies.selection import SecondTier
from vllm_kvcompress.scorers.scorer_states import ScorerStates
from vllm_kvcompress.sharing.batch_scheduling import GROUP_KEY
from vllm_kvcompress.sharing.group_prefix import READS_GROUP_PREFIX, is_leader
from vllm_kvcompress.scorers.trained_scorer import TrainedScorer
from vllm_kvcompress.vllm_plugin.cpu_attention import (
    NativeCPUAttention,
    NativeStep,
    native_attention_supported,
)
from vllm_kvcompress.vllm_plugin.device_clock import DeviceClock
from vllm_kvcompress.vllm_plugin.group_prefix_tables import GroupPrefixTables
from vllm_kvcompress.vllm_plugin.kv_cache_spec import max_block_entries, schedule_for
from vllm_kvcompress.vllm_plugin.metrics import CompressionMetrics
from vllm_kvcompress.vllm_plugin.request_settings import (
    policy_for,
    resolve_request_settings,
    server_query_window,
    server_settings,
)

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level


@dataclass
class RequestStreams:
    """One request's compression state in this worker."""

    slot: int
    settings: KVCompressConfig
    schedule: CompressionSchedule | None
    policy: Policy | None
    prompt_len: int
    # Entries of vLLM's block list for this request already handed to the cache.
    block_entries_seen: int = 0
    first_compressed_at: int = 0
    last_compressed_at: int = 0
    num_tokens: int = 0
    # Whether the runtime's layer_densities row of this request holds its densities.
    densities_recorded: bool = False
    # Its kv_group; whether it leads the group's compressed prefix or starts on it.
    group: Hashable | None = None
    leads_group_prefix: bool = False
    reads_group_prefix: bool = False


@dataclass
class CompressionGroup:
    """Requests that compress after this step with the same policy and budget: their
    slots and token counts on the host (the cache's bookkeeping reads them without a
    device sync) and, once planned, the slots on the device [R]."""

    policy: Policy
    budget: int
    slots: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    slot_tensor: torch.Tensor | None = None


class TorchRoute(NamedTuple):
    """How a request attends on the torch path: emitting each slot's probability into the
    accumulated scores, and over its second tier (None: it has none yet)."""

    emit_scores: bool
    second_tier: SecondTier | None


@dataclass
class AttentionPart:
    """Requests of one step that attend together, and how.

    tokens [n] their rows in the step's query (None: every row, in order); query_start_loc
    [R' + 1] over those rows; slots [R'] their cache slots; native: their streams for
    vLLM's CPU kernel, or None for the torch path (`route`).
    """

    tokens: torch.Tensor | None
    query_start_loc: torch.Tensor
    slots: torch.Tensor
    max_query_len: int
    native: NativeStep | None
    route: TorchRoute | None


class ScorerRows(NamedTuple):
    """A trained scorer of the step, its rows [tokens'] int64 (None: every row), where each
    of its R' requests' rows start among them, segments [R' + 1] (CPU), and their cache
    slots [R'] (which hold their contexts in ScorerStates)."""

    scorer: TrainedScorer
    rows: torch.Tensor | None
    segments: torch.Tensor
    slots: torch.Tensor


@dataclass
class StepPlan:
    """The attention metadata of one step, shared by every layer.

    slot_ids [L, tokens, H] where each layer writes its new K/V; positions [tokens] token
    positions; scorers: the trained scorers that score the new tokens as they are
    written, each with its rows; attention: one part, or two when only some requests'
    policies accumulate attention (they take the torch path, the others vLLM's kernel);
    density_slots: the requests whose policy needs layer densities and whose prompt
    completes (or first compression comes) in this step (None: none).
    Groups whose policy needs layer densities compress every layer after the last one
    attended (layer 0's budget depends on every layer's density).
    """

    num_tokens: int
    slot_ids: torch.Tensor
    positions: torch.Tensor
    window_writes: WindowWrites | None
    attention: list[AttentionPart]
    groups: list[CompressionGroup]
    density_slots: torch.Tensor | None = None
    scorers: list[ScorerRows] = field(default_factory=list)


def _rows_of(members: list[int], query_lens: list[int]) -> torch.Tensor:
    """[tokens'] int64 on the host: the step's token rows of requests `members`, in order."""
    starts = [0, *itertools.accumulate(query_lens)]
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members])


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    """[R + 1] where each of R consecutive runs of `lens` [R] rows starts (and the end)."""
    return torch.cat([lens.new_zeros(1), lens.cumsum(0)])


# Bytes a compression may take beside the cache: a group's gathered streams and the
# policy's scores. Larger groups compress in several passes (reserved on GPUs, which size
# the KV cache before the first step).
COMPRESSION_WORKSPACE_BYTES = 512 << 20


def stream_buffers(vllm_config, kv_caches: list[torch.Tensor], num_kv_heads: int,
                   head_size: int, block_size: int, keys_transposed: bool
                   ) -> tuple[PagedStreamCache, QueryWindow, torch.Tensor]:
    """Everything the runtime allocates beside vLLM's KV tensors (on their device): the
    stream cache's tables and side pools, the query window, and layer_densities [S, L]
    (D2O's attention density of each layer at the end of a request's prompt, by slot)."""
    num_layers, device, dtype = len(kv_caches), kv_caches[0].device, kv_caches[0].dtype
    max_requests = vllm_config.scheduler_config.max_num_seqs
    max_model_len = vllm_config.model_config.max_model_len
    num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
    pools = [head_block_pools(kv, block_size, head_size, keys_transposed) for kv in kv_caches]
    # A stream never holds more than its request's tokens, plus the one head-block past
    # ceil(len / block_size) that releases and re-appends leave.
    cache = PagedStreamCache(
        num_layers, num_kv_heads, head_size, kv_caches[0].shape[0], max_requests,
        max_block_entries(max_model_len, block_size), block_size=block_size, dtype=dtype,
        device=device, kv_memory=kv_caches, kv_pools=pools,
        max_blocks_per_stream=-(-max_model_len // block_size) + 2)
    window = QueryWindow(num_layers, max_requests,
                         server_query_window(server_settings(vllm_config)), num_heads,
                         head_size, dtype, device)
    return cache, window, torch.zeros(max_requests, num_layers, device=device)


def workspace_passes(group: CompressionGroup, bytes_per_token: int,
                     limit: int) -> list[CompressionGroup]:
    """`group` cut into runs of requests whose gathered streams, each padded to the run's
    longest, take at most `limit` bytes (`bytes_per_token` per token of a request, all
    its KV heads); a request that alone exceeds it still runs, alone."""
    passes: list[CompressionGroup] = []
    longest = 0
    for slot, tokens in zip(group.slots, group.tokens):
        longest = max(longest, tokens)
        if not passes or (len(passes[-1].slots) + 1) * longest * bytes_per_token > limit:
            passes.append(CompressionGroup(group.policy, group.budget))
            longest = tokens
        passes[-1].slots.append(slot)
        passes[-1].tokens.append(tokens)
    return passes


class CompressionRuntime:
    def __init__(self, vllm_config, runner, kv_caches: list[torch.Tensor], num_kv_heads: int,
                 head_size: int, block_size: int):
        self.vllm_config = vllm_config
        self.runner = runner
        self.server = server_settings(vllm_config)
        self.max_model_len = vllm_config.model_config.max_model_len
        self.prefix_caching = vllm_config.cache_config.enable_prefix_caching
        self.num_layers = len(kv_caches)
        self.num_kv_heads, self.head_size, self.block_size = num_kv_heads, head_size, block_size
        # This rank's first KV head among the model's (trained scorers index by it).
        self.first_kv_head = get_tensor_model_parallel_rank() * num_kv_heads
        self.dtype = kv_caches[0].dtype
        max_requests = vllm_config.scheduler_config.max_num_seqs
        num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        # vLLM's CPU kernel attends unless forced off (VLLM_KVCOMPRESS_KERNELS=torch).
        self.native = None
        if (kv_caches[0].device.type == "cpu"
                and native_attention_supported(kv_caches[0].dtype, head_size, block_size)
                and requested_impl() == "auto"):
            self.native = NativeCPUAttention(kv_caches, num_heads, num_kv_heads, head_size,
                                             block_size)
        self.cache, self.window, self.layer_densities = stream_buffers(
            vllm_config, kv_caches, num_kv_heads, head_size, block_size,
            keys_transposed=self.native is not None)
        self.num_heads = num_heads
        # The attention gate's running context of each request, by cache slot.
        self.scorer_states = ScorerStates(max_requests, self.num_layers, num_kv_heads,
                                          kv_caches[0].device)
        self.requests: dict[str, RequestStreams] = {}
        self.free_slots = list(range(max_requests - 1, -1, -1))
        self.metrics = CompressionMetrics(publish=get_tensor_model_parallel_rank() == 0)
        self.group_prefixes = GroupPrefixTables(self.cache, self.prefix_caching)
        self.clock = DeviceClock(self.cache.device)

    # ----- request lifecycle -----

    def end(self, req_ids) -> None:
        """Requests finished or aborted: a group's leader leaves its tables, then all go."""
        for req_id in req_ids:
            streams = self.requests.get(req_id)
            if streams is not None and streams.leads_group_prefix:
                self.group_prefixes.keep(
                    streams.group, streams.slot, streams.prompt_len, streams.num_tokens,
                    streams.settings.budget if streams.schedule else None,
                    bool(streams.first_compressed_at))
        self.forget(req_ids)

    def forget(self, req_ids) -> None:
        """Drop finished, aborted or preempted requests (vLLM frees their pages)."""
        for req_id in req_ids:
            streams = self.requests.pop(req_id, None)
            if streams is None:
                continue
            self.cache.reset([streams.slot])
            self.window.reset(host_to_device([streams.slot], torch.int64, self.cache.device))
            self.free_slots.append(streams.slot)

    def _admit(self, req_id: str, req_state) -> RequestStreams:
        extra_args = req_state.sampling_params.extra_args if req_state.sampling_params else None
        settings = resolve_request_settings(self.server, extra_args, self.max_model_len,
                                            prompt_len=req_state.num_prompt_tokens)
        if settings.kv_quality is not None and settings.enabled:
            self.metrics.add_quality_budget(settings.budget)
        policy = policy_for(settings) if settings.enabled else None
        schedule = schedule_for(settings, self.block_size, self.num_layers, self.prefix_caching,
                                self.head_size, self.dtype)
        extra = extra_args or {}
        streams = RequestStreams(self.free_slots.pop(), settings, schedule, policy,
                                 prompt_len=req_state.num_prompt_tokens,
                                 group=extra.get(GROUP_KEY), leads_group_prefix=is_leader(extra),
                                 reads_group_prefix=bool(extra.get(READS_GROUP_PREFIX)))
        self.requests[req_id] = streams
        if policy is not None and policy.write_scorer is not None:
            self.scorer_states.clear(policy.write_scorer, streams.slot)
        return streams

    def _sync_pages(self, streams: RequestStreams, block_ids: list[int], num_computed: int) -> None:
        """Mirror the scheduler's page bookkeeping for one request (kv_cache_spec.py):
        release the pages past the schedule's bound, then take the newly appended ones.
        A request starting on prefix-cache hits reads their pages as its first tokens."""
        if streams.first_compressed_at:
            keep = streams.schedule.pages_to_keep(num_computed, streams.prompt_len,
                                                  streams.first_compressed_at)
            self.cache.release_pages(streams.slot, keep)
        new_pages = block_ids[streams.block_entries_seen:]
        if new_pages:
            self.cache.add_pages(streams.slot, new_pages)
        shared = 0
        if streams.block_entries_seen == 0 and num_computed:
            if streams.reads_group_prefix:
                self.group_prefixes.attach(streams.group, streams.slot)
            else:
                self.cache.share_prefix(streams.slot, num_computed)
            shared = self.cache.shared_pages[streams.slot]
        self.group_prefixes.pages_reused(new_pages[shared:])
        streams.block_entries_seen = len(block_ids)

    # ----- per step -----

    def plan_step(self, num_reqs: int, query_start_loc_cpu: torch.Tensor) -> StepPlan:
        """Page bookkeeping, token slots and compression decisions for this step."""
        device = self.cache.device
        req_ids = self.runner.input_batch.req_ids[:num_reqs]
        query_lens = (query_start_loc_cpu[1:num_reqs + 1] - query_start_loc_cpu[:num_reqs]).tolist()
        slots, starts = [], []
        groups: dict[tuple, CompressionGroup] = {}
        shared_pages_to_drop: list[tuple[int, int]] = []
        density_slots = []
        routes: list[TorchRoute | None] = []  # per request; None: vLLM's kernel will do
        scorers = []  # per request: its policy's write_scorer or None
        needs_window = False
        for req_id, query_len in zip(req_ids, query_lens):
            req_state = self.runner.requests[req_id]
            num_computed = req_state.num_computed_tokens
            streams = self.requests.get(req_id)
            if streams is not None and num_computed == 0:
                self.forget([req_id])  # restarted from scratch (preempted, then resumed)
                streams = None
            if streams is None:
                streams = self._admit(req_id, req_state)
            self._sync_pages(streams, req_state.block_ids[0], num_computed)
            slots.append(streams.slot)
            starts.append(num_computed)
            streams.num_tokens = num_computed + query_len
            routes.append(self._route(streams))
            scorers.append(None if streams.policy is None else streams.policy.write_scorer)
            if streams.policy is None:
                continue
            needs_window |= streams.policy.needs_window_queries
            due = streams.schedule.should_compress(streams.num_tokens,
                                                   streams.last_compressed_at, streams.prompt_len)
            if (streams.policy.needs_layer_densities and not streams.densities_recorded
                    and (due or streams.num_tokens >= streams.prompt_len)):
                streams.densities_recorded = True
                density_slots.append(streams.slot)
            if due:
                if not streams.first_compressed_at:  # the first compression copies out
                    shared_pages_to_drop.append(
                        (streams.slot, streams.schedule.shared_pages(streams.num_tokens)))
                    streams.first_compressed_at = streams.num_tokens
                streams.last_compressed_at = streams.num_tokens
                budget = streams.settings.budget
                group = groups.setdefault((id(streams.policy), budget),
                                          CompressionGroup(streams.policy, budget))
                group.slots.append(streams.slot)
                group.tokens.append(streams.num_tokens)

        # Host bookkeeping stays on the host: sizes come from Python ints, never from a
        # device tensor (each read would be a sync on a GPU).
        num_tokens = sum(query_lens)
        lens = torch.tensor(query_lens, dtype=torch.int64)
        token_starts = torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), lens,
                                               output_size=num_tokens)
        offsets = torch.arange(num_tokens) - torch.repeat_interleave(
            query_start_loc_cpu[:num_reqs].long(), lens, output_size=num_tokens)
        positions = host_to_device(token_starts + offsets, torch.int64, device)
        slot_tensor = host_to_device(slots, torch.int64, device)
        slot_ids = self.cache.append(slots, query_lens)
        for slot, count in shared_pages_to_drop:
            self.cache.drop_leading_pages(slot, count)
        window_writes = None
        if needs_window:
            window_writes = self.window.plan(slots, query_lens, positions)
            self.window.record_positions(window_writes, positions)
        passes = [part for group in groups.values() for part in self._workspace_passes(group)]
        for group in passes:
            group.slot_tensor = host_to_device(group.slots, torch.int64, device)
        return StepPlan(
            num_tokens=num_tokens, slot_ids=slot_ids, positions=positions,
            window_writes=window_writes,
            attention=self._attention_parts(routes, query_start_loc_cpu[:num_reqs + 1],
                                            query_lens, slot_tensor),
            groups=passes,
            density_slots=(host_to_device(density_slots, torch.int64, device) if density_slots
                           else None),
            scorers=self._scorer_rows(scorers, lens, slot_tensor))

    def _workspace_passes(self, group: CompressionGroup) -> list[CompressionGroup]:
        per_token = 2 * self.head_size * self.dtype.itemsize + 16  # K, V, position, score
        if group.policy.needs_window_queries:
            per_token += 4 * group.policy.query_window * (self.num_heads // self.num_kv_heads)
        return workspace_passes(group, per_token * self.num_kv_heads,
                                COMPRESSION_WORKSPACE_BYTES)

    @staticmethod
    def _scorer_rows(scorers: list, lens: torch.Tensor, slots: torch.Tensor) -> list[ScorerRows]:
        """Each distinct trained scorer of the step with the token rows it scores, where
        each of its requests' rows start among them, and the requests' slots."""
        distinct = [s for s in dict.fromkeys(scorers) if s is not None]
        if len(distinct) == 1 and all(s is distinct[0] for s in scorers):
            return [ScorerRows(distinct[0], None, _offsets(lens), slots)]
        parts, query_lens = [], lens.tolist()
        for scorer in distinct:
            members = [i for i, s in enumerate(scorers) if s is scorer]
            parts.append(ScorerRows(scorer, host_to_device(_rows_of(members, query_lens),
                                                           torch.int64, slots.device),
                                    _offsets(lens[members]),
                                    slots[host_to_device(members, torch.int64, slots.device)]))
        return parts

    def _route(self, streams: RequestStreams) -> TorchRoute | None:
        """The torch path for a request whose policy reads each slot's attention
        probability, or which may have rows in a second tier (compressed in an earlier
        step), and wherever vLLM's kernel does not run; else None."""
        policy = streams.policy
        emit = policy is not None and policy.needs_accumulated
        tier = None
        if policy is not None and streams.first_compressed_at:
            tier = policy.second_tier_for(streams.settings.budget, self.head_size)
        if emit or tier is not None or self.native is None:
            return TorchRoute(emit, tier)
        return None

    def _attention_parts(self, routes: list[TorchRoute | None], query_start_loc_cpu: torch.Tensor,
                         query_lens: list[int], slots: torch.Tensor) -> list[AttentionPart]:
        """One part per distinct route among the step's requests (vLLM's kernel for those
        with none), each over its own rows."""
        distinct = list(dict.fromkeys(routes))
        if len(distinct) == 1:
            return [self._attention_part(None, query_start_loc_cpu, query_lens, slots,
                                         distinct[0])]
        return [self._attention_part([i for i, r in enumerate(routes) if r == route],
                                     query_start_loc_cpu, query_lens, slots, route)
                for route in distinct]

    def _attention_part(self, members: list[int] | None, query_start_loc_cpu: torch.Tensor,
                        query_lens: list[int], slots: torch.Tensor,
                        route: TorchRoute | None) -> AttentionPart:
        """The part made of the step's requests `members` (indices; None: all of them)."""
        device = self.cache.device
        starts, tokens = query_start_loc_cpu, None
        if members is not None:
            tokens = host_to_device(_rows_of(members, query_lens), torch.int64, device)
            query_lens = [query_lens[i] for i in members]
            starts = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=starts.dtype)
            slots = slots[host_to_device(members, torch.int64, device)]
        step = None
        if route is None:
            step = self.native.plan(starts, sum(query_lens), self.cache.tables.block_tables,
                                    self.cache.tables.lengths, slots)
        return AttentionPart(tokens=tokens,
                             query_start_loc=host_to_device(starts, torch.int32, device),
                             slots=slots,
                             max_query_len=max(query_lens, default=0), native=step,
                             route=route)

    def forward(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                plan: StepPlan, scale: float, output: torch.Tensor) -> None:
        """One layer's step: store K/V, attend, compress the layer's due streams.

        query [tokens, Hq, D], key/value [tokens, H, D]; writes output[:tokens]."""
        n = plan.num_tokens
        scores = self._written_scores(layer, query[:n], key[:n], value[:n], plan)
        self.cache.write(layer, plan.slot_ids[layer], key[:n], value[:n], plan.positions, scores)
        if plan.window_writes is not None:
            self.window.record(layer, plan.window_writes, query[:n])
        for part in plan.attention:
            rows = slice(0, n) if part.tokens is None else part.tokens
            if part.native is not None:
                output[rows] = self.native.forward(layer, query[rows], part.native, scale)
            else:
                output[rows] = self.cache.attention(
                    layer, query[rows], part.query_start_loc, part.slots, scale,
                    emit_scores=part.route.emit_scores, max_query_len=part.max_query_len,
                    second_tier=part.route.second_tier)
        if plan.density_slots is not None:
            self._record_densities(layer, plan.density_slots)
        if not plan.groups:
            return
        started = self.clock.start()
        last_layer = layer == self.num_layers - 1
        for group in plan.groups:
            if not group.policy.needs_layer_densities:
                self._compress(layer, group, scale)
            elif last_layer:
                for each_layer in range(self.num_layers):
                    self._compress(each_layer, group, scale)
        # Count each compressed request once, on the last layer.
        requests = sum(len(group.slots) for group in plan.groups) if last_layer else 0
        self.clock.stop(started, lambda seconds: self.metrics.add_compression(seconds, requests))

    def _written_scores(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, plan: StepPlan) -> torch.Tensor | None:
        """[tokens, H] the trained scorers' scores of the new tokens (0 for rows of requests
        without one), or None when no request of the step has one."""
        if not plan.scorers:
            return None
        queries = query.reshape(key.shape[0], self.num_kv_heads, -1, self.head_size)
        if len(plan.scorers) == 1 and plan.scorers[0].rows is None:  # the usual step: one scorer
            return self._score_part(layer, plan.scorers[0], queries, key, value, plan.positions)
        scores = torch.zeros(key.shape[:2], dtype=torch.float32, device=key.device)
        for part in plan.scorers:
            take = part.rows
            scores[take] = self._score_part(layer, part, queries[take], key[take], value[take],
                                            plan.positions[take])
        return scores

    def _score_part(self, layer: int, part: ScorerRows, queries: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        state = self.scorer_states.read(part.scorer, part.slots, layer)
        scores = part.scorer.score(layer, queries, key, value, positions,
                                   first_head=self.first_kv_head, segments=part.segments,
                                   state=state)
        self.scorer_states.write(part.scorer, part.slots, layer, state)
        return scores

    def _record_densities(self, layer: int, slots: torch.Tensor) -> None:
        """D2O's attention density of this layer for the requests in `slots`; after the last
        layer, averaged over the tensor-parallel ranks (each measured its own KV heads), so
        every rank gives a layer the same budget as one rank holding all heads would."""
        view = self.cache.gather(layer, slots)
        self.layer_densities[slots, layer] = attention_density(view.scores, view.lengths,
                                                               self.num_kv_heads)
        ranks = get_tensor_model_parallel_world_size()
        if layer == self.num_layers - 1 and ranks > 1:
            self.layer_densities[slots] = tensor_model_parallel_all_reduce(
                self.layer_densities[slots]) / ranks

    def _compress(self, layer: int, group: CompressionGroup, scale: float) -> None:
        policy, slots = group.policy, group.slot_tensor
        view = self.cache.gather(layer, group.slots)
        window_queries = window_positions = None
        if policy.needs_window_queries:
            window_queries, window_positions = self.window.read(
                layer, slots, self.num_kv_heads, policy.query_window)
        densities = self.layer_densities[slots] if policy.needs_layer_densities else None
        batch = StreamBatch(
            keys=view.keys, values=view.values, lengths=view.lengths,
            positions=view.positions, acc_scores=view.scores,
            num_kv_heads=self.num_kv_heads, layer=layer, num_layers=self.num_layers,
            scale=scale, window_queries=window_queries, window_positions=window_positions,
            layer_densities=densities, first_head=self.first_kv_head)
        self.cache.compact(layer, group.slots, policy.compress(batch, group.budget))

    def report(self) -> None:
        """Refresh the gauges (twice a second at most; reading the lengths is a device sync;
        at once when nothing runs any more) and log one summary line every LOG_INTERVAL_S.
        Bytes count both tiers of every layer; under tensor parallelism this rank's heads
        stand for the model's."""
        self.clock.collect()
        if not self.requests:
            self.metrics.observe_idle()
            return
        if not self.metrics.gauges_due():
            return
        slot_list = [s.slot for s in self.requests.values()]
        slots = torch.tensor(slot_list, device=self.cache.device)
        seen = sum(s.num_tokens for s in self.requests.values())
        kept = float(self.cache.tables.lengths[:, slots].float().mean(dim=(0, 2)).sum())
        ranks = get_tensor_model_parallel_world_size()
        token_bytes = self.num_layers * self.num_kv_heads * 2 * self.head_size * self.dtype.itemsize
        bytes_kept = self.cache.bytes_held(slot_list) * ranks
        self.metrics.observe(seen, kept, seen * token_bytes * ranks, bytes_kept)
        if not self.metrics.log_due():
            return
        compressing = sum(s.policy is not None for s in self.requests.values())
        logger.info("vllm-kvcompress: %d running (%d compressed), %d tokens kept of %d seen "
                    "(%.1fx), KV bytes %.1f%% of full, compression %.1f%% of step time so far",
                    len(self.requests), compressing, round(kept), seen,
                    seen / kept if kept else 1.0,
                    100 * bytes_kept / (seen * token_bytes * ranks) if seen else 100.0,
                    100 * self.metrics.compression_share())
