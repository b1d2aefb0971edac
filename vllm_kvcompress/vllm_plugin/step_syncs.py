"""Host syncs per engine step: cache/host_syncs.py's counter around the runtime's two
per-step entry points, plan_step and forward (an in-process engine only)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vllm_kvcompress.cache.host_syncs import HostSyncCounter
from vllm_kvcompress.vllm_plugin.runtime import CompressionRuntime


@dataclass
class StepSyncs:
    """One step: its token count, whether it compressed, syncs by "file:line"."""

    num_tokens: int
    compresses: bool
    sites: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


@contextmanager
def counting_step_syncs() -> Iterator[list[StepSyncs]]:
    """`with counting_step_syncs() as steps:` run the engine; `steps` fills as it steps."""
    steps: list[StepSyncs] = []
    plan_step, forward = CompressionRuntime.plan_step, CompressionRuntime.forward

    def counted_plan_step(runtime, *args, **kwargs):
        with HostSyncCounter() as syncs:
            plan = plan_step(runtime, *args, **kwargs)
        steps.append(StepSyncs(plan.num_tokens, bool(plan.groups), syncs.sites))
        return plan

    def counted_forward(runtime, *args, **kwargs):
        with HostSyncCounter() as syncs:
            forward(runtime, *args, **kwargs)
        steps[-1].sites.update(syncs.sites)

    CompressionRuntime.plan_step, CompressionRuntime.forward = counted_plan_step, counted_forward
    try:
        yield steps
    finally:
        CompressionRuntime.plan_step, CompressionRuntime.forward = plan_step, forward
