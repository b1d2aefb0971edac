"""End to end: a real `vllm serve` process with the plugin, real HTTP requests."""

from __future__ import annotations

import os
import subprocess

import openai
import pytest
from transformers import AutoTokenizer

from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, CPU_DEFAULT_ENV, VllmServer, vllm_command


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "vllm.log"
    args = [*CPU_DEFAULT_ARGS, "--max-model-len", "2048", "--served-model-name", "smol",
            "--kv-policy", "none"]
    with VllmServer(model_dir, args, log) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_plugin_loaded_in_server(server):
    log = server.log_path.read_text()
    assert "'kv_policy': 'none'" in log  # vLLM echoes non-default args, ours included


def test_completion(client):
    reply = client.completions.create(model="smol", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens > 0


def test_chat(client, model_dir):
    # The chat route answers what the completions route answers for the templated prompt
    # (what a 135M model says to this question in bf16 differs between CPU kinds).
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="smol", max_tokens=24, temperature=0,
                                           messages=messages)
    prompt = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    same = client.completions.create(model="smol", prompt=prompt, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].message.content == same.choices[0].text
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens


def test_streaming(client):
    stream = client.completions.create(model="smol", prompt="The capital of France is",
                                       max_tokens=8, temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) >= 2  # arrived in several chunks
    assert "Paris" in "".join(pieces)


def test_bad_policy_exits_with_one_clear_line(model_dir):
    result = subprocess.run(
        [*vllm_command(), "serve", str(model_dir), "--kv-policy", "fastest"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **CPU_DEFAULT_ENV},
    )
    assert result.returncode != 0
    assert "argument --kv-policy: invalid choice: 'fastest'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow    # a second `vllm serve` start (~20 s); bad budgets are unit-tested in test_config
def test_bad_budget_exits_with_one_clear_line(model_dir):
    result = subprocess.run(
        [*vllm_command(), "serve", str(model_dir), "--kv-policy", "snapkv", "--budget", "-3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **CPU_DEFAULT_ENV},
    )
    assert result.returncode != 0
    assert "vllm-kvcompress: error: --budget=-3" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
