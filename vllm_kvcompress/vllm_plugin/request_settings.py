"""Per-request compression settings: the server's, overridden by a request's extra args.

A request may set `kv_policy`, `budget` (or `kv_quality`), `kv_window` and `kv_policy_args` through the
OpenAI body's `vllm_xargs` (or `SamplingParams(extra_args=...)` offline; vLLM's HTTP API
takes no nested objects there, so `kv_policy_args` may come as a JSON string). The same
function validates them in the API server (a bad value is an HTTP 400) and resolves them
in the engine core and the workers, so every process sees the same settings for a request.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.policies import Policy, make_policy
from vllm_kvcompress.policies.quality_budget import budget_for_quality
from vllm_kvcompress.scorers.weights import check_model

# Keys a request may override; the rest (interval, prefill mode, sinks) are per server.
REQUEST_KEYS = ("kv_policy", "budget", "kv_quality", "kv_window", "kv_policy_args")

# Queries the workers keep per request and layer (observation window) at the least, so
# requests can pick a policy with a window of that size on any server.
MIN_QUERY_WINDOW = 32


def policy_for(settings: KVCompressConfig) -> Policy:
    """The policy of `settings`: one shared instance per distinct configuration in this
    process (policies keep no per-request state), so admitting a request builds none."""
    # JSON: option values may be lists (layer lists from a config file), which don't hash.
    return _shared_policy(settings.kv_policy, settings.kv_window, settings.kv_sinks,
                          json.dumps(settings.kv_policy_args, sort_keys=True))


def check_scorer_model(settings: KVCompressConfig, hf_config) -> None:
    """KVCompressConfigError unless the trained scorer of the settings' policy (if it has
    one) was trained for the served model (hf_config: its transformers config)."""
    scorer = policy_for(settings).write_scorer if settings.enabled else None
    if scorer is None:
        return
    try:
        check_model(scorer, hf_config)
    except ValueError as error:
        raise KVCompressConfigError(f"--kv-policy {settings.kv_policy}: {error}") from None


@functools.cache
def _shared_policy(name: str, window: int | None, sinks: int | None, options: str) -> Policy:
    return make_policy(name, window=window, sinks=sinks, **json.loads(options))


def server_query_window(server: KVCompressConfig) -> int:
    """Window queries the workers keep per request and layer: the server policy's window,
    at least MIN_QUERY_WINDOW."""
    return max(MIN_QUERY_WINDOW, policy_for(server).query_window if server.enabled else 0)


def server_settings(vllm_config) -> KVCompressConfig:
    return KVCompressConfig.from_additional_config(vllm_config.additional_config)


def request_overrides(extra_args: dict[str, Any] | None) -> dict[str, Any]:
    overrides = {k: v for k, v in (extra_args or {}).items() if k in REQUEST_KEYS}
    options = overrides.get("kv_policy_args")
    if isinstance(options, str):
        try:
            overrides["kv_policy_args"] = json.loads(options)
        except json.JSONDecodeError:
            raise KVCompressConfigError(f"kv_policy_args={options!r}: must be a JSON object "
                                        "of the policy's options") from None
    return overrides


def resolve_request_settings(server: KVCompressConfig, extra_args: dict[str, Any] | None,
                             max_model_len: int, prompt_len: int | None = None) -> KVCompressConfig:
    """The settings for one request of `prompt_len` tokens (None: not known yet, as in the
    API server; a kv_quality target then leaves the budget as it is). Raises
    KVCompressConfigError on a bad override."""
    settings = _overridden(server, request_overrides(extra_args), max_model_len)
    if settings.kv_quality is None or prompt_len is None or not settings.enabled:
        return settings
    budget = budget_for_quality(settings.kv_quality_curves, settings.kv_policy,
                                settings.kv_quality, prompt_len)
    return settings.model_copy(update={"budget": budget})


def _overridden(server: KVCompressConfig, overrides: dict[str, Any],
                max_model_len: int) -> KVCompressConfig:
    if not overrides:
        return server
    if "budget" in overrides and "kv_quality" in overrides:
        raise KVCompressConfigError("budget and kv_quality: give one of them (kv_quality "
                                    "picks the budget)")
    if isinstance(overrides.get("kv_policy_args"), dict) and "weights" in overrides["kv_policy_args"]:
        # A client must not make the server read files of its choosing.
        raise KVCompressConfigError("kv_policy_args.weights: a server setting "
                                    "(kv_policy_args in --kv-config), not allowed per request")
    if not server.enabled:
        raise KVCompressConfigError(
            f"per-request {', '.join(sorted(overrides))}: KV compression is off on this "
            "server (start it with --kv-policy <policy>)"
        )
    values = server.model_dump()
    if "budget" in overrides:
        values["kv_quality"] = None  # a fixed budget replaces the server's target
    if overrides.get("kv_policy", server.kv_policy) != server.kv_policy:
        values["kv_policy_args"] = {}   # the server's options belong to the server's policy
    settings = KVCompressConfig.from_dict({**values, **overrides})
    settings.check_max_model_len(max_model_len)
    if not settings.enabled:
        return settings
    window, kept = policy_for(settings).query_window, server_query_window(server)
    if window > kept:
        raise KVCompressConfigError(
            f"kv_window={window}: this server keeps the last {kept} queries per request "
            f"(allowed: 0 to {kept}; start it with --kv-window {window} for more)")
    return settings

