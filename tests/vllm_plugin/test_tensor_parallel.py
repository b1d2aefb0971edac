"""Compression under vLLM's tensor parallelism: the bundled model's 3 KV heads sharded over
3 CPU worker processes, one head each."""

from __future__ import annotations

import pytest
import torch
from engine_driver import all_pages_free, prompt_of_length, run, scheduler, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.vllm_plugin import runtime_registry

# Three worker processes: over 2 min on a 2-core CPU.
pytestmark = pytest.mark.slow

BUDGET, INTERVAL, BLOCK_SIZE = 64, 16, 32


def compression_state(worker) -> tuple[int, bool, torch.Tensor]:
    """Run in each worker (collective_rpc): its runtime's KV heads, whether it compressed,
    its D2O layer densities [request slots, layers]."""
    runtime = runtime_registry.get()
    return (runtime.num_kv_heads, runtime.metrics.compression_total_s > 0,
            runtime.layer_densities.clone())


def test_three_ranks_generate_what_one_rank_does(model_dir, monkeypatch):
    """SnapKV selects each head's slots on their own, and D2O's layer densities are
    averaged over the ranks, so sharding the heads over ranks changes nothing: the same
    greedy tokens, the same pages held, every page back."""
    # vLLM binds each CPU rank's threads to its own NUMA node unless told not to; these
    # machines have one node.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of_length(tokenizer, n, seed=n) for n in (600, 90, 500)]
    greedy = dict(max_tokens=12, temperature=0, ignore_eos=True)
    params = [SamplingParams(**greedy)] * 2 + [
        SamplingParams(**greedy, extra_args={"kv_policy": "d2o"})]
    config = {"kv_policy": "snapkv", "budget": BUDGET, "kv_interval": INTERVAL}
    outputs, live_pages, workers = {}, {}, {}
    for ranks in (1, 3):
        with started_llm(model_dir, max_model_len=1024, tensor_parallel_size=ranks,
                         additional_config=config) as llm:
            manager = scheduler(llm).compressed_manager
            pages = []

            def record(step, manager=manager, pages=pages):
                long = [r for r in manager.req_to_blocks if r.startswith("r0")]
                pages.append(manager.num_live_pages(long[0]) if long else 0)

            outputs[ranks] = run(llm, prompts, params, after_step=record).outputs
            live_pages[ranks] = pages
            workers[ranks] = llm.collective_rpc(compression_state)
            # One more request delivers the finishes to the workers.
            run(llm, [prompts[1][:20]], SamplingParams(max_tokens=1))
            assert all_pages_free(llm)
    assert [state[:2] for state in workers[1]] == [(3, True)]
    assert [state[:2] for state in workers[3]] == [(1, True)] * 3
    # The rows the d2o request recorded (vLLM sizes the slots per world size).
    recorded = [state[2][state[2].abs().sum(dim=1) > 0] for state in workers[1] + workers[3]]
    assert len(recorded[0]) == 1
    # Each density sums a prompt's attention rows in float32, in another order on 3 ranks:
    # relative error up to (rows summed) x eps (1.03e-5 measured on an AVX2 machine). A
    # rank without the all-reduce holds its one head's density: up to 123% off (measured).
    rtol = max(len(p) for p in prompts) * torch.finfo(torch.float32).eps
    for rank_densities in recorded[1:]:
        torch.testing.assert_close(rank_densities, recorded[0], rtol=rtol, atol=1e-9)
    assert outputs[3] == outputs[1]
    assert live_pages[3] == live_pages[1]
    # The long prompt held all its pages while prefilling, then only the bound's.
    held = [p for p in live_pages[3] if p]
    assert max(held) >= 600 // BLOCK_SIZE
    assert held[-1] <= (BUDGET + INTERVAL + BLOCK_SIZE) // BLOCK_SIZE + 1
