"""Host syncs per engine step on the compressed path: what a GPU step would wait for,
counted on CPU around the runtime's two per-step entry points (vllm_plugin/step_syncs.py)."""

from __future__ import annotations

from engine_driver import prompt_of_length, run, started_llm
from transformers import AutoTokenizer
from vllm import SamplingParams

from vllm_kvcompress.vllm_plugin import runtime_registry
from vllm_kvcompress.vllm_plugin.step_syncs import counting_step_syncs


def test_decode_steps_read_the_device_once_and_compressing_layers_twice(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [prompt_of_length(tokenizer, n, seed=n) for n in (150, 260)]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    with (counting_step_syncs() as steps,
          started_llm(model_dir, additional_config={"kv_policy": "snapkv", "budget": 64}) as llm):
        run(llm, prompts, greedy)
        num_layers = runtime_registry.get().num_layers
    decode = [s for s in steps if s.num_tokens == len(prompts) and not s.compresses]
    compressing = [s for s in steps if s.compresses]
    assert len(decode) > 20 and compressing
    # Decode: the one read is append's capacity check (cache/append.py says why).
    worst = max(decode, key=lambda s: s.total)
    assert worst.total <= 1, worst.sites
    # Per compressing layer: compaction's one read (survivors' count and longest stream);
    # plus append's check. The gather pads to the host's bound.
    worst = max(compressing, key=lambda s: s.total)
    assert worst.total <= num_layers + 1, worst.sites.most_common(8)
