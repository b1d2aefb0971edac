"""The vLLM path agrees with the reference runner (eval/reference_runner.py): same prompt,
policy and budget -> the same kept token positions in every stream and the same greedy
tokens."""

from __future__ import annotations

import pytest
import torch
from engine_driver import prompt_of_length, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.eval.reference_runner import ActivePolicy, ReferenceRunner
from vllm_kvcompress.eval.settings import Setting
from vllm_kvcompress.vllm_plugin import runtime_registry

POLICIES = ("ems", "snapkv", "h2o", "streaming", "pyramidkv", "adakv", "kvmerger", "d2o", "cam",
            "elastic", "think", "mikv")
BUDGET, INTERVAL, MAX_TOKENS = 128, 16, 40
PROMPT_LENGTHS = (420, 700)
# (policy, prompt) pairs left out: ill-conditioned in float32, not a disagreement. In
# layer 4 of prompt 0 two adjacent keys have a cosine 1.2e-7 from KVMerger's merge
# threshold (0.8), so the last bit of vLLM's vs transformers' keys decides that merge.
NEAR_TIES = {("kvmerger", 0)}
CASES = [(policy, index) for policy in POLICIES for index in range(len(PROMPT_LENGTHS))
         if (policy, index) not in NEAR_TIES]


@pytest.fixture(scope="module")
def prompts(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [prompt_of_length(tokenizer, n, seed=300 + n) for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def vllm_results(model_dir, prompts):
    """{(policy, prompt index): (greedy tokens, kept positions [layer][head])}: all
    requests in one batch, each read from the worker right after its last step (the worker
    forgets a request on the step after)."""
    results = {}
    with started_llm(model_dir, max_model_len=2048, additional_config={
            "kv_policy": "snapkv", "budget": BUDGET, "kv_interval": INTERVAL}) as llm:
        engine = llm.llm_engine
        for policy, index in CASES:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                    extra_args={"kv_policy": policy})
            engine.add_request(f"{policy}/{index}", {"prompt_token_ids": prompts[index]}, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    policy, index = output.request_id.split("/")
                    results[policy, int(index)] = (list(output.outputs[0].token_ids),
                                                   worker_kept_positions(output.request_id))
    return results


def worker_kept_positions(request_id: str) -> list[list[torch.Tensor]]:
    runtime = runtime_registry.get()
    # vLLM's internal id is the request id plus a random suffix.
    (streams,) = [s for rid, s in runtime.requests.items() if rid.startswith(request_id + "-")]
    kept = []
    for layer in range(runtime.num_layers):
        view = runtime.cache.gather(layer, [streams.slot])
        kept.append([view.positions[head, :view.lengths[head]].cpu()
                     for head in range(runtime.num_kv_heads)])
    return kept


@pytest.fixture(scope="module")
def prefilled(model_dir, prompts):
    """The reference runner and each prompt prefilled once (generate() forks it)."""
    runner = ReferenceRunner(model_dir)
    window = max(ActivePolicy.from_setting(Setting(p, BUDGET)).window for p in POLICIES)
    return runner, [runner.prefill(prompt, window=window) for prompt in prompts]


@pytest.mark.parametrize(("policy", "index"), CASES)
def test_vllm_keeps_what_the_reference_runner_keeps(prefilled, vllm_results, policy, index):
    runner, states = prefilled
    active = ActivePolicy.from_setting(Setting(policy, BUDGET, interval=INTERVAL))
    generation = runner.generate(states[index], MAX_TOKENS, active)
    expected = generation.state.kept_positions()
    tokens, kept = vllm_results[policy, index]

    assert len(generation.state.compressions) >= 2  # after the prompt and during decode
    assert tokens == generation.token_ids
    for layer, (heads, expected_heads) in enumerate(zip(kept, expected)):
        for head, (positions, expected_positions) in enumerate(zip(heads, expected_heads)):
            assert positions.tolist() == expected_positions.tolist(), (layer, head)
