"""End to end with compression on: a real `vllm serve --kv-policy ...`, real HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

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


def metric_names(server: VllmServer) -> set[str]:
    """The metric families /metrics lists (from its `# TYPE` lines)."""
    return {line.split()[2] for line in server.get_text("/metrics").splitlines()
            if line.startswith("# TYPE ")}


@pytest.fixture(scope="module")
def stock(model_dir, prompts, tmp_path_factory) -> dict:
    """Stock vLLM's texts for the prompts, and the metric names it shows after them."""
    log = tmp_path_factory.mktemp("stock") / "vllm.log"
    with VllmServer(model_dir, [*COMMON_ARGS, "--kv-policy", "none"], log) as server:
        return {"texts": complete_all(server, prompts), "metric_names": metric_names(server)}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("compressed") / "vllm.log"
    args = [*COMMON_ARGS, "--kv-policy", "snapkv", "--budget", "256"]
    with VllmServer(model_dir, args, log) as running:
        yield running


# The stock server costs a minute; the invariant is checked in-process in the default suite
# (test_compressed_engine.py), this one over HTTP in the slow suite.
@pytest.mark.slow
def test_budget_above_context_matches_stock(server, prompts, stock):
    stock_texts = stock["texts"]
    # Per-request budget beyond every context: nothing is evicted, outputs are stock's.
    assert complete_all(server, prompts, {"budget": 4000}) == stock_texts
    for policy in ("mikv", "think", "locret", "attention_gate"):
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


@pytest.mark.slow    # needs the stock server
def test_every_stock_metric_is_kept(server, stock, prompts):
    complete_all(server, prompts)
    names = metric_names(server)
    assert stock["metric_names"] <= names
    added = names - stock["metric_names"]
    assert {name for name in added if not name.startswith("vllm:kv_compress_")} == set()
    assert "vllm:kv_compress_compressions_total" in names


def metrics_while_streaming(server: VllmServer, body: dict) -> tuple[dict, str]:
    """Stream a completion, reading /metrics as tokens arrive; returns the first reading
    that counts the request (the gauges describe running requests) and the text."""
    request = urllib.request.Request(
        f"{server.url}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    reading, text = None, ""
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            text += json.loads(line[len(b"data: "):])["choices"][0]["text"]
            if reading is None:
                metrics = server.metrics()
                reading = metrics if metrics["vllm:kv_compress_tokens_seen"] else None
    assert reading is not None, "the gauges never counted the running request"
    return reading, text


def test_gauges_count_running_requests_then_go_idle(server, prompts):
    """A long request under mikv at budget 64: its streams hold 64 tokens at full
    precision and the rest at 4 + 2 bits (64-byte rows against 512 bytes for a float32
    token), so the gauges read well under full KV but above what 64 tokens alone take;
    once it has finished they read 0 tokens, 0 bytes, ratio 1."""
    body = {"model": "smol", "prompt": prompts[-1], "max_tokens": 96, "temperature": 0,
            "ignore_eos": True, "vllm_xargs": {"kv_policy": "mikv", "budget": 64}}
    metrics, text = metrics_while_streaming(server, body)
    assert text
    seen, kept = metrics["vllm:kv_compress_bytes_seen"], metrics["vllm:kv_compress_bytes_kept"]
    tokens_seen = metrics["vllm:kv_compress_tokens_seen"]
    assert seen == tokens_seen * 30 * 3 * 2 * 64 * 4          # layers, KV heads, K+V, D, fp32
    assert 64 / tokens_seen < kept / seen < 0.3
    idle = {"vllm:kv_compress_tokens_seen": 0.0, "vllm:kv_compress_tokens_kept": 0.0,
            "vllm:kv_compress_ratio": 1.0, "vllm:kv_compress_bytes_seen": 0.0,
            "vllm:kv_compress_bytes_kept": 0.0}
    deadline = time.monotonic() + 30
    while (gauges := {name: server.metrics()[name] for name in idle}) != idle:
        assert time.monotonic() < deadline, f"gauges with nothing running: {gauges}"
        time.sleep(0.2)


@pytest.mark.parametrize(("extra", "expected"), [
    ({"budget": 0}, "budget"),
    ({"budget": "many"}, "budget"),
    ({"kv_policy": "fifo"}, "kv_policy"),
    ({"budget": 99999}, "max_model_len"),
    ({"kv_window": 64}, "allowed: 0 to 32"),
    ({"kv_policy": "mikv", "kv_policy_args": '{"key_bits": 0}'}, "key_bits=0"),
    ({"kv_policy": "mikv", "kv_policy_args": "{oops"}, "must be a JSON object"),
    ({"kv_cache_hint": "forget"}, "allowed values: discard, keep"),
    ({"kv_cache_hint": [0, 2]}, "a list of 0/1 per prompt page"),
    ({"kv_group": [1, 2]}, "invalid kv_group"),
    ({"kv_policy": "locret", "kv_policy_args": '{"weights": "/etc/hostname"}'},
     "not allowed per request"),
    ({"kv_group": ""}, "a non-empty string of at most 256 characters or an integer"),
    ({"kv_group": "g", "kv_group_size": 0}, "invalid kv_group_size"),
    ({"kv_group_size": 3}, "kv_group_size in vllm_xargs needs kv_group"),
    ({"kv_group_prefix": True}, "kv_group_prefix in vllm_xargs needs kv_group"),
    ({"kv_group_prefix": True, "kv_group": "g"}, "--kv-scheduling batch"),
    ({"kv_quality": 0.9}, "needs kv_quality_curves"),
    ({"kv_quality": 0.9, "budget": 64}, "give one of them"),
    ({"kv_chunks": [0, 4, 2, 6]}, "kv_chunks span [2, 6] overlaps"),
    ({"kv_chunks": [0, 4, 9]}, "kv_chunks must be"),
    ({"kv_chunks": "[[0, 9999999]]"}, "kv_chunks span [0, 9999999] is empty or outside"),
    ({"kv_chunks": [0, 4]}, "chunk reuse is not built inside vLLM yet"),
])
def test_bad_request_settings_are_http_400(server, extra, expected):
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        server.post("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2,
                                        "vllm_xargs": extra})
    assert excinfo.value.code == 400
    assert expected in json.loads(excinfo.value.read())["error"]["message"]
    # The engine is still serving.
    assert server.post("/v1/completions", {"model": "smol", "prompt": "Hi", "max_tokens": 2})
