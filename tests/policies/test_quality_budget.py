"""A budget from a quality target: the smallest budget whose curve reaches the target,
per policy (the oracle's curve otherwise), and the settings that refuse it without curves."""

from __future__ import annotations

import pytest

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.policies.quality_budget import budget_for_quality, check_curves
from vllm_kvcompress.vllm_plugin.request_settings import resolve_request_settings

CURVES = {"fractions": [0.125, 0.25, 0.5, 1.0],
          "oracle": [0.6, 0.8, 0.95, 1.0],
          "snapkv": [0.3, 0.5, 0.7, 1.0]}


def test_the_smallest_budget_reaching_the_target():
    assert budget_for_quality(CURVES, "snapkv", 0.5, 1000) == 250
    assert budget_for_quality(CURVES, "snapkv", 0.6, 1000) == 375      # between 0.25 and 0.5
    assert budget_for_quality(CURVES, "snapkv", 0.2, 1000) == 125      # below the first point
    assert budget_for_quality(CURVES, "snapkv", 1.0, 1000) == 1000
    assert budget_for_quality(CURVES, "h2o", 0.8, 1000) == 250         # no curve: the oracle's
    budgets = [budget_for_quality(CURVES, "snapkv", q / 20, 4096) for q in range(1, 21)]
    assert budgets == sorted(budgets)


@pytest.mark.parametrize(("curves", "problem"), [
    ({"oracle": [1.0]}, "needs a 'fractions' list"),
    ({**CURVES, "fractions": [0.5, 0.25, 1.0, 1.0]}, "must increase"),
    ({**CURVES, "snapkv": [0.3, 0.2, 0.7, 1.0]}, "'snapkv' must be non-decreasing"),
    ({**CURVES, "snapkv": [0.3, 1.0]}, "as long as 'fractions'"),
])
def test_malformed_curves_are_named(curves, problem):
    assert problem in check_curves(curves)
    with pytest.raises(KVCompressConfigError, match="kv_quality_curves"):
        KVCompressConfig.from_dict({"kv_policy": "snapkv", "kv_quality_curves": curves})


def test_requests_get_budgets_from_their_target():
    server = KVCompressConfig.from_dict({"kv_policy": "snapkv", "budget": 64,
                                         "kv_quality_curves": CURVES})
    assert resolve_request_settings(server, {"kv_quality": 0.5}, 4096, prompt_len=2000).budget == 500
    assert resolve_request_settings(server, {"kv_quality": 0.5}, 4096).budget == 64  # no prompt yet
    assert resolve_request_settings(server, {}, 4096, prompt_len=2000).budget == 64
    with pytest.raises(KVCompressConfigError, match="give one of them"):
        resolve_request_settings(server, {"kv_quality": 0.5, "budget": 32}, 4096)
    with pytest.raises(KVCompressConfigError, match=r"--kv-quality=1.5: .*less than or equal to 1"):
        resolve_request_settings(server, {"kv_quality": 1.5}, 4096)
    # A server-wide target; a request's budget replaces it.
    targeted = server.model_copy(update={"kv_quality": 0.7})
    assert resolve_request_settings(targeted, {}, 4096, prompt_len=1000).budget == 500
    assert resolve_request_settings(targeted, {"budget": 32}, 4096, prompt_len=1000).budget == 32


def test_a_target_without_curves_names_the_profile_command():
    server = KVCompressConfig.from_dict({"kv_policy": "snapkv"})
    with pytest.raises(KVCompressConfigError, match="vllm-kvcompress profile"):
        resolve_request_settings(server, {"kv_quality": 0.9}, 4096)
