"""A quality target inside vLLM: each request's budget is the one its kv_quality and prompt
length give, in the scheduler's page accounting and the worker's compression alike."""

from __future__ import annotations

import pytest
from engine_driver import all_pages_free, prompt_of_length, scheduler, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.policies.quality_budget import budget_for_quality
from vllm_kvcompress.vllm_plugin.runtime import CompressionRuntime

CURVES = {"fractions": [0.125, 0.25, 0.5, 1.0],
          "oracle": [0.6, 0.8, 0.95, 1.0],
          "snapkv": [0.3, 0.5, 0.7, 1.0]}
TARGETS = (0.3, 0.5, 0.7)


def test_each_request_compresses_to_the_budget_its_target_gives(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of_length(tokenizer, n, seed=n) for n in (600, 900)]
    admitted = {}
    admit = CompressionRuntime._admit

    def recording_admit(runtime, req_id, req_state):
        streams = admit(runtime, req_id, req_state)
        admitted[req_id.split("-")[0]] = streams.settings.budget
        return streams

    config = {"kv_policy": "snapkv", "budget": 64, "kv_quality_curves": CURVES}
    with (pytest.MonkeyPatch.context() as patch,
          started_llm(model_dir, additional_config=config) as llm):
        patch.setattr(CompressionRuntime, "_admit", recording_admit)
        engine = llm.llm_engine
        for p, prompt in enumerate(prompts):
            for target in TARGETS:
                params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                        extra_args={"kv_quality": target})
                engine.add_request(f"{p}:{target}", {"prompt_token_ids": prompt}, params)
        schedules = scheduler(llm).compressed_manager.schedules
        scheduled = {rid.split("-")[0]: schedule.budget for rid, schedule in schedules.items()}
        while engine.has_unfinished_requests():
            engine.step()
        assert all_pages_free(llm)
    for p, prompt in enumerate(prompts):
        for target in TARGETS:
            expected = budget_for_quality(CURVES, "snapkv", target, len(prompt))
            assert admitted[f"{p}:{target}"] == scheduled[f"{p}:{target}"] == expected
    assert admitted["1:0.3"] < admitted["1:0.5"] < admitted["1:0.7"] < len(prompts[1])
