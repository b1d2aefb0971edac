"""Prefix-cache replacement inside a real in-process vLLM engine: hints and predictions
move hit rates, never outputs; the pool is whole at the end; --kv-trace replays."""

from __future__ import annotations

import random

import pytest
from engine_driver import (
    all_pages_free,
    block_pool,
    prompt_of_length,
    run,
    scheduler,
    started_llm,
)
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress import LLM as PlanningLLM
from vllm_kvcompress.sharing.cache_sim import replay
from vllm_kvcompress.sharing.replacement import LRU
from vllm_kvcompress.sharing.traces import read_trace
from vllm_kvcompress.vllm_plugin.prefix_cache import PredictedFreeBlockQueue

GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)
KV_TOKENS = 128 * 24    # 24 pages of 128 tokens: the batches below must evict


@pytest.fixture(scope="module")
def waves(model_dir):
    """Two waves of prompts over 3 shared prefixes x 4 documents, in shuffled order."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    systems = [prompt_of_length(tokenizer, 256, seed=900 + s) for s in range(3)]
    docs = [prompt_of_length(tokenizer, 384, seed=950 + d) for d in range(4)]
    prompts = [systems[s] + docs[d] + prompt_of_length(tokenizer, 20, seed=1000 + 10 * s + d)
               for s in range(3) for d in range(4)]
    rng = random.Random(0)
    return [rng.sample(prompts, len(prompts)) for _ in range(2)]


def hinted(count: int, seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    hints = [None, "discard", "keep"]
    return [SamplingParams(**GREEDY, extra_args={"kv_cache_hint": h} if h else None)
            for h in (rng.choice(hints) for _ in range(count))]


@pytest.fixture(scope="module")
def stock_outputs(model_dir, waves):
    with started_llm(model_dir, kv_tokens=KV_TOKENS, max_model_len=2048) as llm:
        return [run(llm, wave, SamplingParams(**GREEDY)).outputs for wave in waves]


def test_predicted_replacement_keeps_outputs_and_pool(model_dir, waves, stock_outputs, tmp_path):
    trace = tmp_path / "trace.jsonl"
    config = {"kv_cache_replacement": "predicted", "kv_trace": str(trace)}
    with started_llm(model_dir, kv_tokens=KV_TOKENS, max_model_len=2048,
                     additional_config=config) as llm:
        queue = block_pool(llm).free_block_queue
        assert isinstance(queue, PredictedFreeBlockQueue)
        evictions = []
        original = queue.policy.pop_victim
        queue.policy.pop_victim = lambda: evictions.append(original()) or evictions[-1]
        for index, wave in enumerate(waves):
            # Random hints, good and bad: only hit rates may move.
            assert run(llm, wave, hinted(len(wave), seed=index)).outputs == stock_outputs[index]
            assert all_pages_free(llm)
        assert any(victim is not None for victim in evictions)   # the policy chose victims
        counted = sum(sample.value for metric in queue.evictions.collect()
                      for sample in metric.samples if sample.name.endswith("_total"))
        assert counted >= sum(victim is not None for victim in evictions)   # by cause
        assert not queue.bits and not scheduler(llm)._bits and not scheduler(llm)._lookups
    lines = read_trace(trace)
    assert len(lines) == sum(len(w) for w in waves)
    assert all(len(line.pages) == (256 + 384 + 20) // 128 for line in lines)
    assert any(line.discard for line in lines)
    # The same pages recur across requests (shared prefixes), so a cache of them hits.
    assert replay(lines, 24, LRU()).hits > 0


@pytest.mark.slow   # 45 s; aborts under compression leave the pool whole: test_compressed_engine
def test_predicted_replacement_with_compression_aborts_leave_pool_whole(model_dir, waves):
    config = {"kv_policy": "snapkv", "budget": 4000, "kv_cache_replacement": "predicted"}
    with started_llm(model_dir, kv_tokens=KV_TOKENS * 4, additional_config=config) as llm:
        stats = run(llm, waves[0], hinted(len(waves[0]), seed=7), abort_after_steps={1: 2, 5: 4})
        assert len(stats.aborted) == 2 and len(stats.outputs) == len(waves[0]) - 2
        assert all_pages_free(llm)
        assert not scheduler(llm)._bits and not scheduler(llm)._lookups


def test_generate_plans_the_batch_and_answers_in_input_order(model_dir, waves):
    prompts = [{"prompt_token_ids": p} for p in waves[0]]
    with started_llm(model_dir, kv_tokens=KV_TOKENS, max_model_len=2048,
                     llm_class=PlanningLLM, kv_cache_replacement="predicted") as llm:
        as_given = llm.generate(prompts, SamplingParams(**GREEDY), plan_batch=False)
        planned = llm.generate(prompts, SamplingParams(**GREEDY))
        plan = llm.last_plan
        assert [o.prompt_token_ids for o in planned] == waves[0]
        assert [o.outputs[0].token_ids for o in planned] == \
            [o.outputs[0].token_ids for o in as_given]
        # The shuffled wave runs system prompt by system prompt, document by document.
        ordered = [tuple(waves[0][i][:256]) for i in plan.order]
        assert sum(a != b for a, b in zip(ordered, ordered[1:])) == 2
        assert plan.num_groups == 3 and plan.order != sorted(plan.order)
        assert all_pages_free(llm)
