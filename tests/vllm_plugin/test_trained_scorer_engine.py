"""Trained-scorer policies inside vLLM: weights checked against the served model before it
starts, and locret's chunked prefill for prompts larger than the KV cache. (Their kept
tokens equal the reference runner's: test_reference_agreement.py.)"""

from __future__ import annotations

import json
import urllib.error

import pytest
from engine_driver import started_llm
from transformers import AutoTokenizer

from vllm_kvcompress.eval.tasks import make_samples
from vllm_kvcompress.scorers.attention_gate import AttentionGates
from vllm_kvcompress.scorers.retaining_heads import RetainingHeads
from vllm_kvcompress.scorers.trained_scorer import ModelShape
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

# Gemma 3 270M's shape: weights trained for it must not run on the bundled SmolLM2.
GEMMA3_270M = ModelShape(model_type="gemma3_text", num_layers=18, num_heads=4, num_kv_heads=1,
                         head_size=256, hidden_size=640, vocab_size=262144, rope_theta=1e6)


SCORERS = [("locret", RetainingHeads), ("attention_gate", AttentionGates)]


@pytest.mark.parametrize(("policy", "scorer"), SCORERS)
def test_weights_for_another_model_are_refused_at_start_up(model_dir, tmp_path, policy, scorer):
    path = tmp_path / f"{scorer.kind}-gemma3-270m.safetensors"
    scorer(GEMMA3_270M, hidden=4).save(path, {})
    config = {"kv_policy": policy, "budget": 64, "kv_policy_args": {"weights": str(path)}}
    with pytest.raises(ValueError) as excinfo, started_llm(model_dir, additional_config=config):
        pass
    message = str(excinfo.value)
    assert "trained for another model" in message and "gemma3_text" in message
    assert "model_type='llama'" in message


@pytest.mark.parametrize(("policy", "scorer"), SCORERS)
def test_missing_weights_name_the_training_command(model_dir, tmp_path, policy, scorer):
    config = {"kv_policy": policy, "budget": 64,
              "kv_policy_args": {"weights": str(tmp_path / "absent.safetensors")}}
    with pytest.raises(ValueError, match=f"vllm-kvcompress train {scorer.kind}"), \
            started_llm(model_dir, additional_config=config):
        pass


@pytest.mark.slow
def test_chunked_locret_serves_a_prompt_four_times_the_cache(model_dir, tmp_path):
    """Locret's setting: with `--kv-prefill-mode chunked` a request holds its budget plus
    one chunk, so `vllm serve` answers a passkey prompt four times larger than its whole
    KV cache, where stock vLLM with the same cache refuses to start."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sample = make_samples(["passkey"], [4000], 3, 5, lambda text: len(tokenizer(text).input_ids))[0]
    cache_pages = 31                        # 992 tokens in 32-token pages
    assert sample.num_tokens >= 4 * cache_pages * 32
    args = [*CPU_DEFAULT_ARGS, "--dtype", "float32", "--max-model-len", "4096",
            "--max-num-batched-tokens", "256", "--served-model-name", "smol",
            "--num-gpu-blocks-override", str(cache_pages)]
    with pytest.raises(RuntimeError, match="during start-up"):
        with VllmServer(model_dir, [*args, "--block-size", "32"], tmp_path / "stock.log"):
            pass
    assert "KV cache is needed" in (tmp_path / "stock.log").read_text()
    compressed = ["--kv-policy", "locret", "--budget", "512", "--kv-prefill-mode", "chunked"]
    with VllmServer(model_dir, [*args, *compressed], tmp_path / "locret.log") as server:
        reply = server.post("/v1/completions", {"model": "smol", "prompt": sample.prompt,
                                                "max_tokens": 10, "temperature": 0})
        pages_freed = server.metrics()["vllm:kv_compress_pages_freed_total"]
        # The cache was sized for the server's bound: a request needing more is refused.
        for extra in ({"budget": 2048}, {"kv_policy": "none"}):
            with pytest.raises(urllib.error.HTTPError) as excinfo:
                server.post("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2,
                                                "vllm_xargs": extra})
            assert excinfo.value.code == 400
            assert "the KV cache holds 30" in json.loads(excinfo.value.read())["error"]["message"]
    assert sample.references[0] in reply["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == sample.num_tokens
    assert pages_freed > 0
