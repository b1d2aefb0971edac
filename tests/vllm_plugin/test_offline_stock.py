"""With the plugin loaded and --kv-policy none, vLLM is stock vLLM: greedy outputs match
transformers token for token on the bundled model."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def transformers_greedy(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        outputs.append(generated[0, ids.shape[1]:].tolist())
    return outputs


def test_policy_none_matches_transformers(model_dir, transformers_greedy):
    from vllm import LLM, SamplingParams

    llm = LLM(str(model_dir), enforce_eager=True, max_model_len=1024, dtype="float32",
              additional_config={"kv_policy": "none"})
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    results = llm.generate(PROMPTS, params, use_tqdm=False)
    vllm_tokens = [list(r.outputs[0].token_ids) for r in results]
    for prompt, got, want in zip(PROMPTS, vllm_tokens, transformers_greedy):
        # transformers stops at EOS; compare the part both produced.
        assert got[: len(want)] == want, prompt
    assert "Paris" in results[0].outputs[0].text
