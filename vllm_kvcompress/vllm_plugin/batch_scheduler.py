"""`--kv-scheduling batch`: BatchLLM's admission and group holding in vLLM's scheduler
(engine core process). The rules are in sharing/batch_scheduling.py; this is the seam.

Admission: before each step, the count of waiting requests whose peak pages fit
(`admissible`) caps vLLM's own admission loop (`max_num_active_reqs`, for that step only),
which then admits them in its order and allocates as usual: nothing else changes.

Holding: when a member of a `kv_group` frees its pages (finished, aborted or preempted),
the pages it shares with a member still to run (or, with `kv_group_size`, still to
arrive) get one more reference, so no eviction can take them; the last member reading a
page drops it when it ends. Held pages are counted by
vLLM's pool as in use, so the accounting stays vLLM's; if nothing runs and the next
request does not fit beside them, the holds give way.
"""

from __future__ import annotations

from collections.abc import Hashable

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_kvcompress.sharing.batch_scheduling import (
    GROUP_KEY,
    GROUP_SIZE_KEY,
    Candidate,
    GroupMembers,
    admissible,
)
from vllm_kvcompress.vllm_plugin.request_settings import server_settings


class BatchScheduler(Scheduler):
    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self.batch_scheduling = server_settings(vllm_config).kv_scheduling == "batch"
        self.max_model_len = vllm_config.model_config.max_model_len
        self.members = GroupMembers()
        self.held: dict[Hashable, dict[Hashable, object]] = {}   # group -> page -> block

    def add_request(self, request) -> None:
        group = request_group(request)
        if self.batch_scheduling and group is not None and request.request_id not in self.requests:
            size = request.sampling_params.extra_args.get(GROUP_SIZE_KEY)
            self._let_go(group, self.members.add(group, request.request_id,
                                                 request.block_hashes, size))
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        if not self.batch_scheduling:
            return super().schedule(*args, **kwargs)
        cap = self.max_num_active_reqs
        running = len(self.running) + self.num_waiting_for_streaming_input
        self.max_num_active_reqs = min(cap, running + self._num_admissible(cap - running))
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_active_reqs = cap

    def _num_admissible(self, limit: int) -> int:
        if limit <= 0 or not self.waiting:
            return 0
        pool = self.kv_cache_manager.block_pool
        reserved = sum(max(self.peak_pages(r) - self.live_pages(r), 0) for r in self.running)

        def candidates():
            for request in self.waiting:
                if self.waits_for_leader(request):
                    return
                yield self.admission_candidate(request)

        def in_use(page) -> bool:
            cached = pool.get_cached_block(page, [0]) if pool.enable_caching else None
            return cached is not None and cached[0].ref_cnt > 0

        count = admissible(candidates(), pool.get_num_free_blocks(), reserved, in_use, limit)
        if count or self.running:
            return count
        if self.held:   # nothing runs and the next request does not fit: holds give way
            for group in list(self.held):
                self.release_held(list(self.held.pop(group).values()))
            return self._num_admissible(limit)
        return 1        # larger than all of memory: it runs alone (vLLM's checks apply)

    def admission_candidate(self, request) -> Candidate:
        pages = request.block_hashes[: request.num_tokens // self.block_size]
        return Candidate(pages, max(self.peak_pages(request) - len(pages), 0))

    def waits_for_leader(self, request) -> bool:
        """The request reads a group prefix whose leader has not ended (scheduler.py)."""
        return False

    def holds_pages_of(self, group: Hashable) -> bool:
        """Whether a group's members keep each other's cached pages."""
        return True

    def final_len(self, request) -> int:
        """Tokens the request holds when it ends: its prompt and max_tokens outputs."""
        return min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)

    def peak_pages(self, request) -> int:
        """Pages the request holds at its peak from where it is now (a compressing
        scheduler counts its bound instead)."""
        return -(-self.final_len(request) // self.block_size)

    def live_pages(self, request) -> int:
        return sum(not block.is_null for block in self.request_blocks(request.request_id))

    def request_blocks(self, request_id: str) -> list:
        """The request's page list (released entries are null); [] with several KV cache
        groups, which compression refuses and replacement leaves to vLLM."""
        managers = self.kv_cache_manager.coordinator.single_type_managers
        return list(managers[0].req_to_blocks.get(request_id, ())) if len(managers) == 1 else []

    def _free_request_blocks(self, request) -> None:
        if self.batch_scheduling:
            self._hold_shared_pages(request)
        super()._free_request_blocks(request)

    def _free_request(self, request, *args, **kwargs):
        result = super()._free_request(request, *args, **kwargs)
        group = self.members.group_of.get(request.request_id)
        self._let_go(group, self.members.remove(request.request_id))
        return result

    def _let_go(self, group: Hashable, pages: list[Hashable]) -> None:
        """Release the group's held pages among `pages`: no member reads or awaits them."""
        held = self.held.get(group)
        if held is None:
            return
        blocks = [held.pop(page) for page in pages if page in held]
        if not held:
            del self.held[group]
        if blocks:
            self.release_held(blocks)

    def _hold_shared_pages(self, request) -> None:
        """Keep the cached pages `request` shares with an unfinished member of its group."""
        shared = self.members.pages_still_needed(request.request_id)
        if not shared or not self.holds_pages_of(self.members.group_of[request.request_id]):
            return
        pool = self.kv_cache_manager.block_pool
        held = self.held.setdefault(self.members.group_of[request.request_id], {})
        for page in shared:
            cached = pool.get_cached_block(page, [0])
            if cached is None:      # not computed (or evicted before the group began)
                break
            if page not in held:
                pool.touch(cached)
                held[page] = cached[0]

    def release_held(self, blocks: list) -> None:
        """No member left reads these held pages: back to the free queue."""
        self.kv_cache_manager.block_pool.free_blocks(blocks)

    @property
    def num_held_pages(self) -> int:
        return len({block.block_id for blocks in self.held.values() for block in blocks.values()})


def request_group(request) -> Hashable | None:
    params = request.sampling_params
    return (params.extra_args or {}).get(GROUP_KEY) if params is not None else None
