"""Per-request compression settings: the server's, overridden by a request's extra args.

A request may set `kv_policy`, `budget` and `kv_window` through the OpenAI body's
`vllm_xargs` (or `SamplingParams(extra_args=...)` offline). The same function validates
them in the API server (a bad value is an HTTP 400) and resolves them in the engine core
and the workers, so every process sees the same settings for a request.
"""

from __future__ import annotations

from typing import Any

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.vllm_plugin.engine_setup import check_servable

# Keys a request may override; the rest (interval, prefill mode, sinks) are per server.
REQUEST_KEYS = ("kv_policy", "budget", "kv_window")


def server_settings(vllm_config) -> KVCompressConfig:
    return KVCompressConfig.from_additional_config(vllm_config.additional_config)


def request_overrides(extra_args: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (extra_args or {}).items() if k in REQUEST_KEYS}


def resolve_request_settings(server: KVCompressConfig, extra_args: dict[str, Any] | None,
                             max_model_len: int) -> KVCompressConfig:
    """The settings for one request. Raises KVCompressConfigError on a bad override."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    if not server.enabled:
        raise KVCompressConfigError(
            f"per-request {', '.join(sorted(overrides))}: KV compression is off on this "
            "server (start it with --kv-policy <policy>)"
        )
    settings = KVCompressConfig.from_dict({**server.model_dump(), **overrides})
    check_servable(settings)
    settings.check_max_model_len(max_model_len)
    return settings

