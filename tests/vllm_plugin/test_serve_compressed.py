"""End to end with compression on: a real `vllm serve --kv-policy ...`, real HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error

import pytest
from transformers import AutoTokenizer

from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

# float32 so that greedy decoding cannot flip on rounding between attention kernels.
COMMON_ARGS = [*CPU_DEFAULT_ARGS, "--max-model-len", "4096", "--dtype", "float32",
               "--served-model-name", "smol"]


@pytest.fixture(scope="module")
def prompts(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentence = "The old lighthouse keeper counted the ships that passed the harbor each night. "
    return [tokenizer.decode(tokenizer(sentence * n).input_ids) for n in (1, 12, 40, 90)]


def complete_all(server: VllmServer, prompts: list[str], extra: dict | None = None) -> list[str]:
    """Send the prompts concurrently (so they share batches) and return the texts."""
    def one(prompt: str) -> str:
        body = {"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, **({"vllm_xargs": extra} if extra else {})}
        return server.post("/v1/completions", body)["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def stock_texts(model_dir, prompts, tmp_path_factory):
    log = tmp_path_factory.mktemp("stock") / "vllm.log"
    with VllmServer(model_dir, [*COMMON_ARGS, "--kv-policy", "none"], log) as server:
        return complete_all(server, prompts)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("compressed") / "vllm.log"
    args = [*COMMON_ARGS, "--kv-policy", "snapkv", "--budget", "256"]
    with VllmServer(model_dir, args, log) as running:
        yield running


def test_budget_above_context_matches_stock(server, prompts, stock_texts):
    # Per-request budget beyond every context: nothing is evicted, outputs are stock's.
    assert complete_all(server, prompts, {"budget": 4000}) == stock_texts
    for policy in ("mikv", "think"):
        assert complete_all(server, prompts, {"kv_policy": policy, "budget": 4000}) == stock_texts


def test_compressed_requests_answer_and_show_on_metrics(server, prompts):
    texts = complete_all(server, prompts)
    assert all(texts)
    chat = server.post("/v1/chat/completions", {
        "model": "smol", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "vllm_xargs": {"kv_policy": "streaming", "budget": 64},
    })
    assert "Paris" in chat["choices"][0]["message"]["content"]
    metrics = server.metrics()
    compressions = metrics["vllm:kv_compress_compressions_total"]
    assert compressions >= 1  # the two longest prompts exceed budget + interval
    assert metrics["vllm:kv_compress_pages_freed_total"] > 0


def test_low_bit_tier_bytes_show_on_metrics(server, prompts):
    """A long request under mikv at budget 64: its streams hold 64 tokens at full
    precision and the rest at 3 + 3 bits (64-byte rows against 512 bytes for a float32
    token), so the gauges read well under full KV but above what 64 tokens alone take."""
    body = {"model": "smol", "prompt": prompts[-1], "max_tokens": 48, "temperature": 0,
            "ignore_eos": True, "vllm_xargs": {"kv_policy": "mikv", "budget": 64}}
    assert server.post("/v1/completions", body)["choices"][0]["text"]
    metrics = server.metrics()   # the gauges keep the last values seen while it ran
    seen, kept = metrics["vllm:kv_compress_bytes_seen"], metrics["vllm:kv_compress_bytes_kept"]
    tokens_seen = metrics["vllm:kv_compress_tokens_seen"]
    assert seen == tokens_seen * 30 * 3 * 2 * 64 * 4          # layers, KV heads, K+V, D, fp32
    assert 64 / tokens_seen < kept / seen < 0.3


@pytest.mark.parametrize(("extra", "expected"), [
    ({"budget": 0}, "budget"),
    ({"budget": "many"}, "budget"),
    ({"kv_policy": "fifo"}, "kv_policy"),
    ({"budget": 99999}, "max_model_len"),
    ({"kv_window": 64}, "allowed: 0 to 32"),
    ({"kv_policy": "mikv", "kv_policy_args": '{"key_bits": 0}'}, "key_bits=0"),
    ({"kv_policy": "mikv", "kv_policy_args": "{oops"}, "must be a JSON object"),
])
def test_bad_request_settings_are_http_400(server, extra, expected):
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        server.post("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2,
                                        "vllm_xargs": extra})
    assert excinfo.value.code == 400
    assert expected in json.loads(excinfo.value.read())["error"]["message"]
    # The engine is still serving.
    assert server.post("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2})
