"""The runtime code the GPU worker runs, run inside vLLM on CPU: every kernel op through
its Triton kernel in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a
GPU), against the torch reference kernels. Same greedy tokens, same kept positions."""

from __future__ import annotations

import pytest
from engine_driver import prompt_of_length, run, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.kernels.dispatch import IMPL_ENV
from vllm_kvcompress.vllm_plugin import runtime_registry

pytestmark = pytest.mark.slow

# One request per kernel family: window scores, score emission, the low-bit tier.
POLICIES = ("snapkv", "h2o", "mikv")


def _run(model_dir, impl: str, monkeypatch):
    monkeypatch.setenv(IMPL_ENV, impl)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of_length(tokenizer, n, seed=n) for n in (80, 110, 95)]
    params = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True,
                             extra_args={"kv_policy": policy}) for policy in POLICIES]
    kept: dict[int, list] = {}

    def snapshot(step: int) -> None:
        runtime = runtime_registry.get()
        slots = sorted(streams.slot for streams in runtime.requests.values())
        if slots:
            kept[step] = [runtime.cache.gather(layer, slots).positions.tolist()
                          for layer in (0, runtime.num_layers - 1)]

    with started_llm(model_dir, additional_config={"kv_policy": "snapkv", "budget": 48,
                                                   "kv_interval": 8}) as llm:
        stats = run(llm, prompts, params, after_step=snapshot)
    return stats.outputs, kept


def test_triton_kernels_in_vllm_match_the_torch_path(model_dir, monkeypatch):
    outputs, kept = _run(model_dir, "torch", monkeypatch)
    triton_outputs, triton_kept = _run(model_dir, "triton", monkeypatch)
    assert triton_outputs == outputs and len(outputs) == len(POLICIES)
    assert triton_kept == kept
    # Streams were compressed (48 of 80+ tokens kept) while the snapshots were taken.
    assert any(len(positions[0][0]) < 80 for positions in kept.values())
