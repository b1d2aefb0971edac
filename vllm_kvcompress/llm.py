"""`vllm_kvcompress.LLM`: vLLM's offline LLM with the compression settings as arguments."""

from __future__ import annotations

from typing import Any

import vllm

from vllm_kvcompress.config import resolve_settings


class LLM(vllm.LLM):
    """`vllm.LLM(model, ...)` plus `kv_policy`, `budget`, ... (the flags' names).

    Example: `LLM(model, kv_policy="snapkv", budget=256).generate(prompts, params)`.
    Settings are validated here (one-line ValueError) and passed to vLLM as
    `additional_config`; everything else, progress bars included, is vLLM's.
    """

    def __init__(self, model: str, *, kv_policy: str | None = None, budget: int | None = None,
                 kv_window: int | None = None, kv_sinks: int | None = None,
                 kv_interval: int | None = None, kv_prefill_mode: str | None = None,
                 kv_config: str | None = None, **kwargs: Any) -> None:
        explicit = {"kv_policy": kv_policy, "budget": budget, "kv_window": kv_window,
                    "kv_sinks": kv_sinks, "kv_interval": kv_interval,
                    "kv_prefill_mode": kv_prefill_mode}
        settings = resolve_settings(kv_config, explicit)
        additional = dict(kwargs.pop("additional_config", None) or {})
        additional.update(settings.to_additional_config())
        super().__init__(model, additional_config=additional, **kwargs)
