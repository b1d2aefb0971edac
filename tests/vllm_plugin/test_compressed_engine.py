"""Compression inside a real in-process vLLM engine on the bundled model."""

from __future__ import annotations

import gc

import pytest
import torch
from engine_driver import block_pool, prompt_of_length, run, scheduler
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from vllm_kvcompress.vllm_plugin import runtime_registry

# float32: the compressed path attends with its own kernels; in bf16 rounding differences
# against vLLM's CPU kernels could flip near-tied greedy tokens.
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=4096, seed=0)
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [prompt_of_length(tokenizer, n, seed=n) for n in (37, 230, 700, 1500)]


def make_llm(model_dir, kv_tokens: int | None = None, **kwargs):
    """An in-process engine; kv_tokens sizes its KV cache (same bytes per token either way)."""
    if kv_tokens is not None:
        compressed = kwargs.get("additional_config", {}).get("kv_policy", "none") != "none"
        block_size = 32 if compressed else 128  # ours vs vLLM's CPU default
        kwargs["num_gpu_blocks_override"] = kv_tokens // block_size
    return LLM(str(model_dir), **{**ENGINE_ARGS, **kwargs})


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def stock_outputs(model_dir, prompts):
    llm = make_llm(model_dir, additional_config={"kv_policy": "none"})
    outputs = run(llm, prompts, GREEDY).outputs
    shutdown(llm)
    return outputs


def test_budget_above_context_matches_stock(model_dir, prompts, stock_outputs):
    """Invariant 3: nothing is evicted, so greedy output equals stock vLLM's, with
    concurrent requests of different lengths (and per-request settings mixed in)."""
    llm = make_llm(model_dir, additional_config={"kv_policy": "snapkv", "budget": 4000})
    params = [GREEDY, SamplingParams(**{**_greedy_kwargs(), "extra_args": {"kv_policy": "h2o"}}),
              SamplingParams(**{**_greedy_kwargs(), "extra_args": {"kv_policy": "none"}}),
              GREEDY]
    outputs = run(llm, prompts, params).outputs
    shutdown(llm)
    assert outputs == stock_outputs


def _greedy_kwargs():
    return dict(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)


def test_tight_memory_runs_more_requests_at_once(model_dir, tokenizer):
    """A workload whose full KV does not fit: stock vLLM decodes few requests at a time,
    compression decodes more (counted in the scheduler's running list), and all complete."""
    prompts = [prompt_of_length(tokenizer, 800, seed=100 + i) for i in range(8)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    # 3,584 tokens of KV: room for ~4 such requests at full length, all 8 compressed.
    stock = make_llm(model_dir, kv_tokens=3584, max_model_len=2048)
    stock_stats = run(stock, prompts, params)
    shutdown(stock)
    compressed = make_llm(model_dir, kv_tokens=3584, max_model_len=2048,
                          additional_config={"kv_policy": "snapkv", "budget": 128})
    stats = run(compressed, prompts, params)
    pool = block_pool(compressed)
    free_after = pool.get_num_free_blocks()
    total = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
    shutdown(compressed)
    assert len(stock_stats.outputs) == len(stats.outputs) == 8
    assert all(len(tokens) == 48 for tokens in stats.outputs.values())
    assert stock_stats.max_decoding <= 4
    assert stats.max_decoding > stock_stats.max_decoding
    assert free_after == total


def test_no_leak_under_aborts_and_preemption(model_dir, tokenizer):
    """Invariant 1: after a burst with aborts and preemptions every page is free again and
    the worker holds no stream of an ended request."""
    prompts = [prompt_of_length(tokenizer, n, seed=200 + n) for n in
               (300, 700, 500, 900, 400, 800, 600, 350)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm = make_llm(model_dir, kv_tokens=1536, max_model_len=1024,  # tight: preemptions
                   additional_config={"kv_policy": "ems", "budget": 384, "kv_interval": 8})
    stats = run(llm, prompts, params, abort_after_steps={1: 3, 4: 10, 6: 30})
    assert stats.preemptions > 0
    assert len(stats.outputs) == len(prompts) - len(stats.aborted)
    # One more request delivers the previous finishes to the worker.
    run(llm, [prompts[0][:50]], SamplingParams(max_tokens=2))
    runtime = runtime_registry.get()
    pool = block_pool(llm)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert len(runtime.requests) <= 1  # only the last one, finished in the final step
    free_pages = torch.tensor([b.block_id for b in pool.free_block_queue.get_all_free_blocks()])
    runtime.cache.check_invariants(free_pages)
    shutdown(llm)


def test_per_request_overrides_and_bad_values(model_dir, prompts):
    llm = make_llm(model_dir, additional_config={"kv_policy": "ems", "budget": 256})
    mixed = [SamplingParams(**_greedy_kwargs(), extra_args=extra) for extra in (
        None, {"kv_policy": "streaming", "budget": 64}, {"budget": 96, "kv_window": 16},
        {"kv_policy": "snapkv"})]
    stats = run(llm, prompts, mixed)
    assert len(stats.outputs) == 4
    runtime = runtime_registry.get()
    assert {s.settings.kv_policy for s in runtime.requests.values()} == {"ems", "streaming", "snapkv"}
    for extra, expected in [({"budget": 0}, "budget"), ({"kv_policy": "lru"}, "kv_policy"),
                            ({"budget": 100000}, "max_model_len"),
                            ({"kv_policy": "mikv"}, "not implemented inside vLLM")]:
        with pytest.raises(ValueError, match=expected):
            llm.generate(["hello"], SamplingParams(max_tokens=2, extra_args=extra),
                         use_tqdm=False)
    shutdown(llm)


def test_scheduler_releases_pages_after_prefill(model_dir, tokenizer):
    """A long prompt holds all its pages while prefilling, then only the bound's."""
    llm = make_llm(model_dir, additional_config={"kv_policy": "streaming", "budget": 128})
    prompt = prompt_of_length(tokenizer, 2000, seed=7)
    engine = llm.llm_engine
    engine.add_request("long", {"prompt_token_ids": prompt},
                       SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    manager = scheduler(llm).compressed_manager
    live = []
    while engine.has_unfinished_requests():
        engine.step()
        request_ids = [r for r in manager.req_to_blocks if r.startswith("long")]
        live.append(manager.num_live_pages(request_ids[0]) if request_ids else 0)
    shutdown(llm)
    block_size = 32
    assert max(live) >= 2000 // block_size        # the whole prompt during prefill
    assert 0 < min(p for p in live if p) <= (128 + 16 + block_size) // block_size + 1
