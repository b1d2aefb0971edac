"""Retrieval end to end: seeded ~2k-token passkey prompts through a real `vllm serve
--kv-policy ems`, at a budget where the reference runner retrieves the passkey."""

from __future__ import annotations

import pytest

from vllm_kvcompress.eval.endpoint_runner import EndpointRunner
from vllm_kvcompress.eval.harness import evaluate
from vllm_kvcompress.eval.reference_runner import ReferenceRunner
from vllm_kvcompress.eval.settings import Setting
from vllm_kvcompress.eval.tasks import make_samples
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

# ~3 min on a 2-core AVX2 CPU; tests/eval/test_endpoint_runner.py serves in the default suite.
pytestmark = pytest.mark.slow

# docs/quality.md: ems keeps the passkey of 2k prompts in 3 of 5 depths at budget 1024
# (CR 2), in 1 of 5 at 256-512; the bundled 135M model loses digits quickly.
SETTING = Setting("ems", 1024)


def test_served_ems_answers_the_passkey_like_the_reference_runner(model_dir, tmp_path):
    reference_runner = ReferenceRunner(model_dir)
    samples = make_samples(["passkey"], [2048], num_samples=5, seed=0,
                           count_tokens=reference_runner.count_tokens)
    reference = {r.index: r for r in evaluate(reference_runner, samples, [SETTING])}
    retrieved = [index for index, record in reference.items() if record.score == 1.0]
    assert retrieved, "the reference runner must retrieve at this budget"

    args = [*CPU_DEFAULT_ARGS, "--dtype", "float32", "--max-model-len", "4096",
            "--kv-policy", SETTING.policy, "--budget", str(SETTING.budget),
            "--kv-interval", str(SETTING.interval)]
    with VllmServer(model_dir, args, tmp_path / "vllm.log") as server:
        served = {r.index: r for r in evaluate(EndpointRunner(server.url, xargs="never"),
                                               samples, [SETTING])}

    for index in retrieved:
        assert served[index].score == 1.0, (served[index].output, samples[index].references)
    assert {i: r.output for i, r in served.items()} == {i: r.output for i, r in reference.items()}
