"""Compression inside a real in-process vLLM engine on the bundled model."""

from __future__ import annotations

import pytest
import torch
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
from vllm.exceptions import VLLMValidationError

from vllm_kvcompress.vllm_plugin import runtime_registry

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [prompt_of_length(tokenizer, n, seed=n) for n in (37, 230, 700, 1500)]


@pytest.fixture(scope="module")
def stock_outputs(model_dir, prompts):
    with started_llm(model_dir, additional_config={"kv_policy": "none"}) as llm:
        return run(llm, prompts, GREEDY).outputs


def test_budget_above_context_matches_stock(model_dir, prompts, stock_outputs):
    """Invariant 3: nothing is evicted, so greedy output equals stock vLLM's, with
    concurrent requests of different lengths (and per-request settings mixed in)."""
    params = [GREEDY, SamplingParams(**{**_greedy_kwargs(), "extra_args": {"kv_policy": "h2o"}}),
              SamplingParams(**{**_greedy_kwargs(), "extra_args": {"kv_policy": "none"}}),
              GREEDY]
    with started_llm(model_dir, additional_config={"kv_policy": "snapkv", "budget": 4000}) as llm:
        outputs = run(llm, prompts, params).outputs
        assert outputs == stock_outputs
        # Policies with a second tier (MiKV's low-bit tier, ThinK's narrow keys) too.
        tiered = [SamplingParams(**_greedy_kwargs(), extra_args=extra) for extra in (
            {"kv_policy": "mikv"}, {"kv_policy": "think"},
            {"kv_policy": "mikv", "kv_policy_args": {"base": "h2o", "lowbit_budget": 8}},
            {"kv_policy": "think", "kv_policy_args": {"base": "h2o"}})]
        assert run(llm, prompts, tiered).outputs == stock_outputs


def _greedy_kwargs():
    return dict(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)


def test_tight_memory_runs_more_requests_at_once(model_dir, tokenizer):
    """A workload whose full KV does not fit: stock vLLM decodes few requests at a time,
    compression decodes more (counted in the scheduler's running list), and all complete."""
    prompts = [prompt_of_length(tokenizer, 500, seed=100 + i) for i in range(6)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    # 1,536 tokens of KV: room for 2-3 such requests at full length, all 6 compressed.
    with started_llm(model_dir, kv_tokens=1536, max_model_len=1024) as stock:
        stock_stats = run(stock, prompts, params)
    with started_llm(model_dir, kv_tokens=1536, max_model_len=1024,
                     additional_config={"kv_policy": "snapkv", "budget": 128}) as compressed:
        stats = run(compressed, prompts, params)
        pool = block_pool(compressed)
        free_after = pool.get_num_free_blocks()
        total = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
    assert len(stock_stats.outputs) == len(stats.outputs) == 6
    assert all(len(tokens) == 32 for tokens in stats.outputs.values())
    assert stock_stats.max_decoding <= 3
    assert stats.max_decoding > stock_stats.max_decoding
    assert free_after == total


def test_no_leak_under_aborts_and_preemption(model_dir, tokenizer):
    """Invariant 1: after a burst with aborts and preemptions every page is free again and
    the worker holds no stream of an ended request."""
    # Prompts below the budget are admitted at their size, then grow until the budget
    # stops them: the pool runs out mid-decode and vLLM preempts.
    prompts = [prompt_of_length(tokenizer, n, seed=200 + n) for n in
               (280, 300, 320, 260, 310, 290, 270, 330)]
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    with started_llm(model_dir, kv_tokens=1536, max_model_len=1024,  # tight: preemptions
                     additional_config={"kv_policy": "ems", "budget": 384,
                                        "kv_interval": 8}) as llm:
        stats = run(llm, prompts, params, abort_after_steps={1: 3, 4: 20, 6: 40})
        assert stats.preemptions > 0
        assert len(stats.outputs) == len(prompts) - len(stats.aborted)
        # One more request delivers the previous finishes to the worker.
        run(llm, [prompts[0][:50]], SamplingParams(max_tokens=2))
        runtime = runtime_registry.get()
        assert all_pages_free(llm)
        assert len(runtime.requests) <= 1  # only the last one, finished in the final step
        runtime.forget(list(runtime.requests))  # what the worker does on the next step
        # Block 0 is vLLM's null block: never handed out, so count it as free here.
        free_blocks = block_pool(llm).free_block_queue.get_all_free_blocks()
        free_pages = torch.tensor([0] + [b.block_id for b in free_blocks])
        runtime.cache.check_invariants(free_pages)


def test_per_request_overrides_and_bad_values(model_dir, prompts):
    mixed = [SamplingParams(**_greedy_kwargs(), extra_args=extra) for extra in (
        None, {"kv_policy": "streaming", "budget": 64}, {"budget": 96, "kv_window": 16},
        {"kv_policy": "snapkv"})]
    with started_llm(model_dir, additional_config={"kv_policy": "ems", "budget": 256}) as llm:
        stats = run(llm, prompts, mixed)
        assert len(stats.outputs) == 4
        runtime = runtime_registry.get()
        policies = {s.settings.kv_policy for s in runtime.requests.values()}
        assert policies == {"ems", "streaming", "snapkv"}
        for extra, expected in [({"budget": 0}, "budget"), ({"kv_policy": "lru"}, "kv_policy"),
                                ({"budget": 100000}, "max_model_len"),
                                # the server keeps ems's 32 window queries per request
                                ({"kv_window": 64}, "kv_window=64"),
                                ({"kv_policy": "mikv", "kv_policy_args": {"key_bits": 9}},
                                 "key_bits=9: must be an integer >= 1 and <= 8"),
                                ({"kv_policy": "mikv", "kv_policy_args": {"lowbit_budget": -1}},
                                 "lowbit_budget=-1"),
                                ({"kv_policy": "think", "kv_policy_args": {"base": "mikv"}},
                                 "base='mikv': must be one of: snapkv"),
                                ({"kv_policy_args": {"lowbit_budget": 3}},
                                 "unknown option 'lowbit_budget' for policy 'ems'"),
                                ({"kv_policy_args": "{not json"}, "must be a JSON object")]:
            with pytest.raises(VLLMValidationError, match=expected):
                llm.generate(["hello"], SamplingParams(max_tokens=2, extra_args=extra),
                             use_tqdm=False)


def test_scheduler_releases_pages_after_prefill(model_dir, tokenizer):
    """A long prompt holds all its pages while prefilling, then only the bound's."""
    prompt = prompt_of_length(tokenizer, 2000, seed=7)
    live = []
    with started_llm(model_dir, additional_config={"kv_policy": "streaming",
                                                   "budget": 128}) as llm:
        engine = llm.llm_engine
        engine.add_request("long", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        manager = scheduler(llm).compressed_manager
        while engine.has_unfinished_requests():
            engine.step()
            request_ids = [r for r in manager.req_to_blocks if r.startswith("long")]
            live.append(manager.num_live_pages(request_ids[0]) if request_ids else 0)
    block_size = 32
    assert max(live) >= 2000 // block_size        # the whole prompt during prefill
    assert 0 < min(p for p in live if p) <= (128 + 16 + block_size) // block_size + 1


def test_chunked_prefill_mode_compresses_between_chunks(model_dir, tokenizer):
    """--kv-prefill-mode chunked: a prompt prefilled in vLLM's chunks is compressed after
    each chunk, so it never holds its whole prompt; policies of every signal kind (window
    queries, accumulated attention, D2O's layer densities) finish and every page returns."""
    prompt = prompt_of_length(tokenizer, 2000, seed=11)
    config = {"kv_policy": "snapkv", "budget": 128, "kv_prefill_mode": "chunked"}
    finished, most_pages = {}, 0
    with started_llm(model_dir, max_num_batched_tokens=256, additional_config=config) as llm:
        engine = llm.llm_engine
        for policy in ("snapkv", "h2o", "d2o"):
            engine.add_request(policy, {"prompt_token_ids": prompt}, SamplingParams(
                max_tokens=8, temperature=0, ignore_eos=True, extra_args={"kv_policy": policy}))
        manager = scheduler(llm).compressed_manager
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = len(output.outputs[0].token_ids)
            snapkv = [r for r in manager.req_to_blocks if r.startswith("snapkv")]
            if snapkv:
                most_pages = max(most_pages, manager.num_live_pages(snapkv[0]))
        assert all_pages_free(llm)
    assert finished == {"snapkv": 8, "h2o": 8, "d2o": 8}
    # At most budget + interval - 1 kept tokens and one 256-token chunk, in 32-token pages.
    assert most_pages <= -(-(128 + 16 - 1 + 256 + 31) // 32) < 2000 // 32


@pytest.mark.parametrize("policy", [
    "snapkv",
    # The second tiers' rows in the request's own pages: ~80 s each on a 2-core CPU.
    pytest.param("mikv", marks=pytest.mark.slow),
    pytest.param("think", marks=pytest.mark.slow),
])
def test_prefix_caching_shares_pages_that_compression_never_writes(model_dir, tokenizer, policy):
    """Invariant 5 with vLLM's prefix caching on (its default): requests sharing a prompt
    prefix read its cached pages instead of computing them, compression never writes a
    hashed page (a second tier's rows go to the request's own pages too), an
    accumulated-attention policy stays out of the cache, and every answer equals the one
    with prefix caching off."""
    prefix = prompt_of_length(tokenizer, 600, seed=300)
    prompts = [prefix + prompt_of_length(tokenizer, 40 + 30 * i, seed=310 + i) for i in range(4)]
    # r2 never compresses, so it holds shared pages to the end; r3's h2o sums every query's
    # attention, which a cache hit would skip.
    params = [GREEDY, GREEDY] + [SamplingParams(**_greedy_kwargs(), extra_args=extra)
                                 for extra in ({"budget": 4000}, {"kv_policy": "h2o"})]
    config = {"kv_policy": policy, "budget": 64, "kv_interval": 8}
    with started_llm(model_dir, additional_config=config, enable_prefix_caching=False) as llm:
        expected = run(llm, prompts, params).outputs
    with started_llm(model_dir, additional_config=config) as llm:
        first = run(llm, prompts[:1], params[:1])              # writes the prefix's pages
        pool, runtime = block_pool(llm), runtime_registry.get()
        heads = runtime.num_kv_heads
        cached = _hashed_pages(pool)
        assert len(cached) >= 600 // 32
        def page_contents(block: int) -> list[torch.Tensor]:
            rows = slice(block * heads, (block + 1) * heads)
            return [torch.cat([layer.keys[rows], layer.values[rows]])
                    for layer in runtime.cache.layers]

        contents = {block: page_contents(block) for block in cached}

        def check_sharing(step: int) -> None:
            if step < 3:
                runtime.cache.check_invariants()  # pages held by several requests included
                r2 = next(s for rid, s in runtime.requests.items() if rid.startswith("r2"))
                assert runtime.cache.shared_pages[r2.slot] >= 576 // 32

        stats = run(llm, prompts, params, after_step=check_sharing)
        now = _hashed_pages(pool)
        unchanged = [block for block, block_hash in cached.items() if now.get(block) == block_hash]
        assert len(unchanged) >= 600 // 32
        for block in unchanged:
            for now_layer, before in zip(page_contents(block), contents[block]):
                assert torch.equal(now_layer, before)
        assert all_pages_free(llm)
    assert all(stats.cached_tokens[f"r{i}"] >= 576 for i in range(3))
    assert stats.cached_tokens["r3"] == 0                     # h2o: outside the cache
    assert first.outputs["r0"] == expected["r0"]
    assert stats.outputs == expected


def _hashed_pages(pool) -> dict:
    """{page id: its prefix-cache hash} of every page vLLM has hashed."""
    return {block.block_id: block.block_hash for block in pool.blocks
            if block.block_hash is not None}


@pytest.mark.parametrize("policy", ["snapkv", pytest.param("mikv", marks=pytest.mark.slow)])
def test_prompts_near_max_model_len_with_prefix_caching(model_dir, tokenizer, policy):
    """The first compression of a shared-prefix request holds its full prompt pages and the
    compressed bound at once (with mikv: its low-bit rows too): near max_model_len that is
    more pages than the context has, and vLLM's worker block table must have room for them."""
    prompt = prompt_of_length(tokenizer, 1000, seed=11)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                             extra_args={"budget": budget}) for budget in (256, 256, 900)]
    with started_llm(model_dir, max_model_len=1024,
                     additional_config={"kv_policy": policy, "budget": 256}) as llm:
        stats = run(llm, [prompt] * 3, params)
        assert all_pages_free(llm)
    assert all(len(tokens) == 24 for tokens in stats.outputs.values())
    assert len(stats.outputs) == 3 and stats.cached_tokens["r1"] >= 900
