"""Turn compression on in a VllmConfig (called once the config is built)."""

from __future__ import annotations

from vllm.config import VllmConfig

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError

# Policies the vLLM integration can run; the others exist as pure tensor code only.
SERVABLE_POLICIES: frozenset[str] = frozenset()


class PolicyNotServableError(KVCompressConfigError, NotImplementedError):
    """The policy is known but not implemented inside vLLM yet."""


def check_servable(settings: KVCompressConfig) -> None:
    if settings.enabled and settings.kv_policy not in SERVABLE_POLICIES:
        servable = ", ".join(["none", *sorted(SERVABLE_POLICIES)])
        raise PolicyNotServableError(
            f"--kv-policy={settings.kv_policy}: not implemented inside vLLM yet "
            f"(available now: {servable})"
        )


def enable_compression(vllm_config: VllmConfig, settings: KVCompressConfig) -> None:
    check_servable(settings)
