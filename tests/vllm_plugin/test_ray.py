"""Ray: vLLM's Ray executor refuses CPU (documented), and a Ray Data batch job over
`vllm_kvcompress.LLM` on a two-node cluster started as a user would (`ray start`), one
engine per node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer, free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SETTINGS = dict(kv_policy="snapkv", budget=64, max_model_len=1024, dtype="float32",
                enforce_eager=True)


@pytest.fixture
def ray_env(tmp_path) -> dict[str, str]:
    """Ray's environment: a user's shell (without this suite's vLLM settings) and its own
    HOME, since a local `ray.init()` leaves an auth token in ~/.ray that a cluster started
    later by `ray start` then refuses."""
    home = tmp_path / "home"
    home.mkdir()
    env = {name: value for name, value in os.environ.items()
           if name not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def test_vllm_ray_executor_refuses_cpu_with_its_own_error(model_dir, tmp_path, ray_env):
    args = [*CPU_DEFAULT_ARGS, "--kv-policy", "snapkv", "--budget", "64",
            "--distributed-executor-backend", "ray"]
    with pytest.raises(RuntimeError, match="exited"):
        VllmServer(model_dir, args, tmp_path / "vllm.log", env=ray_env,
                   startup_timeout=240).start()
    assert "current platform cpu does not support ray" in (tmp_path / "vllm.log").read_text()


@pytest.fixture
def ray_cluster(ray_env):
    """A head and a worker node on this machine, one CPU each, started and stopped with
    Ray's own commands as on several machines."""
    # Short: Ray's socket paths live under it and must stay under 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = free_port()
    address = f"127.0.0.1:{port}"
    for node in (["--head", f"--port={port}", "--include-dashboard=false",
                  f"--temp-dir={temp_dir}"], [f"--address={address}"]):
        subprocess.run([str(BIN / "ray"), "start", *node, "--num-cpus=1"],
                       check=True, capture_output=True, env=ray_env, timeout=180)
    try:
        yield address
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True,
                       env=ray_env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_data_batch_answers_like_llm_generate(model_dir, tmp_path, ray_env, ray_cluster):
    sentence = "The old lighthouse keeper counted the ships that passed the harbor each night. "
    question = "Question {}: what did the keeper count?"
    rows = [{"id": i, "prompt": sentence * (4 + 7 * i) + question.format(i), "max_tokens": 6 + i}
            for i in range(6)]
    source, answers = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = subprocess.run(
        [str(BIN / "vllm-kvcompress"), "ray-batch", str(source), str(answers),
         "--model", str(model_dir), "--kv-policy", "snapkv", "--budget", "64",
         "--max-model-len", "1024", "--dtype", "float32", "--batch-size", "3",
         "--actors", "2", "--address", ray_cluster],
        capture_output=True, text=True, env=ray_env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads(line) for line in answers.read_text().splitlines()]

    from vllm import SamplingParams

    from vllm_kvcompress import LLM

    llm = LLM(str(model_dir), **SETTINGS)
    expected = [output.outputs[0].text for output in llm.generate(
        [row["prompt"] for row in rows],
        [SamplingParams(max_tokens=row["max_tokens"], temperature=0) for row in rows])]
    assert [row["id"] for row in got] == [row["id"] for row in rows]
    assert [row["text"] for row in got] == expected
    assert all(expected)
