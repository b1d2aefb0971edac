"""`vllm serve --tensor-parallel-size 3` with compression: real HTTP, the bundled model's 3
KV heads on 3 CPU ranks (slow: two servers, and 3 ranks share the machine's cores)."""

from __future__ import annotations

import pytest
from engine_driver import prompt_of_length
from transformers import AutoTokenizer

from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

pytestmark = pytest.mark.slow


def test_three_served_ranks_answer_like_one_and_count_each_compression_once(model_dir,
                                                                             tmp_path):
    prompt = prompt_of_length(AutoTokenizer.from_pretrained(model_dir), 640, seed=21)
    args = [*CPU_DEFAULT_ARGS, "--dtype", "float32", "--max-model-len", "1024",
            "--served-model-name", "smol", "--kv-policy", "snapkv", "--budget", "64",
            "--kv-interval", "16"]
    body = {"model": "smol", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    texts, compressions = {}, {}
    for ranks in (1, 3):
        # vLLM binds each CPU rank to its own NUMA node unless told not to (one node here).
        with VllmServer(model_dir, [*args, "--tensor-parallel-size", str(ranks)],
                        tmp_path / f"serve-tp{ranks}.log",
                        env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}) as server:
            texts[ranks] = server.post("/v1/completions", body)["choices"][0]["text"]
            compressions[ranks] = server.metrics()["vllm:kv_compress_compressions_total"]
    assert texts[3] == texts[1]
    # One rank publishes: the 3-rank server counts what the 1-rank server counts.
    assert compressions[1] >= 1
    assert compressions[3] == compressions[1]
