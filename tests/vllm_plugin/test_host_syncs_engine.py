"""Host syncs per engine step on the compressed path: what a GPU step would wait for,
counted on CPU by cache/host_syncs.py around the runtime's two per-step entry points."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine_driver import prompt_of_length, run, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.cache.host_syncs import HostSyncCounter
from vllm_kvcompress.vllm_plugin import runtime_registry
from vllm_kvcompress.vllm_plugin.runtime import CompressionRuntime


@dataclass
class Step:
    num_tokens: int
    compresses: bool
    syncs: Counter = field(default_factory=Counter)


def test_decode_steps_read_the_device_once_and_compressing_layers_twice(model_dir, monkeypatch):
    steps: list[Step] = []
    plan_step, forward = CompressionRuntime.plan_step, CompressionRuntime.forward

    def counted_plan_step(self, *args, **kwargs):
        with HostSyncCounter() as syncs:
            plan = plan_step(self, *args, **kwargs)
        steps.append(Step(plan.num_tokens, bool(plan.groups), syncs.sites))
        return plan

    def counted_forward(self, *args, **kwargs):
        with HostSyncCounter() as syncs:
            forward(self, *args, **kwargs)
        steps[-1].syncs.update(syncs.sites)

    monkeypatch.setattr(CompressionRuntime, "plan_step", counted_plan_step)
    monkeypatch.setattr(CompressionRuntime, "forward", counted_forward)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of_length(tokenizer, n, seed=n) for n in (150, 260)]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    with started_llm(model_dir, additional_config={"kv_policy": "snapkv", "budget": 64}) as llm:
        run(llm, prompts, greedy)
        num_layers = runtime_registry.get().num_layers
    decode = [s for s in steps if s.num_tokens == len(prompts) and not s.compresses]
    compressing = [s for s in steps if s.compresses]
    assert len(decode) > 20 and compressing
    # Decode: the one read is append's capacity check (cache/append.py says why).
    worst = max(decode, key=lambda s: sum(s.syncs.values()))
    assert sum(worst.syncs.values()) <= 1, worst.syncs
    # Per compressing layer: the longest stream (gather) and the survivors' count
    # (compaction); plus append's check.
    worst = max(compressing, key=lambda s: sum(s.syncs.values()))
    assert sum(worst.syncs.values()) <= 2 * num_layers + 1, worst.syncs.most_common(8)
