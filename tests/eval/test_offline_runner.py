"""Offline vLLM (`vllm.LLM`) answers like the reference runner: at policy none, and (slow)
with policies that run inside vLLM."""

from __future__ import annotations

import pytest

from vllm_kvcompress.eval.harness import evaluate
from vllm_kvcompress.eval.offline_runner import OfflineRunner
from vllm_kvcompress.eval.settings import Setting, settings_grid
from vllm_kvcompress.eval.tasks import make_samples


@pytest.mark.slow    # ~40 s; the endpoint runner's real-serve test covers vLLM in the default suite
def test_offline_vllm_with_policy_none(model_dir, runner, count_tokens):
    samples = make_samples(["passkey"], [512], num_samples=2, seed=0, count_tokens=count_tokens)
    offline = evaluate(OfflineRunner(str(model_dir), {"dtype": "float32"}), samples, [Setting()])
    reference = evaluate(runner, samples, [Setting()])
    assert {r.index: r.output for r in offline} == {r.index: r.output for r in reference}
    assert all(r.score == 1.0 for r in offline)


@pytest.mark.slow
def test_offline_vllm_compressing_answers_like_the_reference_runner(model_dir, runner, count_tokens):
    """The vLLM integration against its oracle: same prompts, same policies, float32."""
    samples = make_samples(["needle_single"], [1024], num_samples=2, seed=0, count_tokens=count_tokens)
    settings = settings_grid(["snapkv", "h2o"], [64])
    offline = evaluate(OfflineRunner(str(model_dir), {"dtype": "float32"}), samples, settings)
    reference = evaluate(runner, samples, settings)
    assert ({(r.index, r.setting): r.output for r in offline}
            == {(r.index, r.setting): r.output for r in reference})
