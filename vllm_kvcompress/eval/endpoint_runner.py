"""Answer samples through any OpenAI-compatible completions endpoint.

Measures stock `vllm serve`, `vllm serve` with this plugin (per-request settings as
`vllm_xargs`), or any other server, with the same prompts and greedy decoding.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from vllm_kvcompress.eval.harness import OnAnswer
from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.settings import Setting

# What a request may override on this plugin's server (vllm_plugin/request_settings.py,
# REQUEST_KEYS); interval and sinks are the server's own flags.
REQUEST_KEYS = ("kv_policy", "budget", "kv_quality", "kv_window", "kv_policy_args")

# When to put a setting in the request body's `vllm_xargs`:
#   auto:   compressed settings only (dense requests are plain, so stock servers answer them)
#   always: every setting, dense as {"kv_policy": "none"} (a plugin server with another default)
#   never:  no extra fields; the server's own configuration decides, and the single setting
#           given only labels the results
XARGS_MODES = ("auto", "always", "never")


def vllm_xargs(setting: Setting) -> dict[str, Any]:
    """The setting's per-request part, as vLLM's extra arguments (which take no nested
    objects over HTTP: policy options travel as a JSON string)."""
    values = {key: value for key, value in setting.plugin_settings().items() if key in REQUEST_KEYS}
    if "kv_policy_args" in values:
        values["kv_policy_args"] = json.dumps(values["kv_policy_args"])
    return values


def check_room_for_answers(samples: Sequence[Sample], max_model_len: int | None) -> None:
    """Refuse samples whose prompt and answer do not fit the server's context: vLLM cuts
    max_tokens to what is left, which would score truncated answers as wrong."""
    if max_model_len is None:
        return
    for sample in samples:
        if sample.num_tokens + sample.max_new_tokens > max_model_len:
            raise ValueError(
                f"{sample.task} at length {sample.target_length}: {sample.num_tokens} prompt "
                f"tokens + {sample.max_new_tokens} answer tokens exceed the server's "
                f"max_model_len {max_model_len}; use --lengths of at most "
                f"{max_model_len - sample.max_new_tokens} or a larger --max-model-len")


class EndpointRunner:
    """url: the server's base URL (without /v1). model: the served model name (None =
    the first one /v1/models lists). concurrency: requests in flight at once."""

    def __init__(self, url: str, model: str | None = None, xargs: str = "auto",
                 concurrency: int = 4, timeout: float = 600.0):
        if xargs not in XARGS_MODES:
            raise ValueError(f"xargs must be one of {XARGS_MODES}, got {xargs!r}")
        self.url = url.rstrip("/")
        self.model = model
        self.xargs = xargs
        self.concurrency = concurrency
        self.timeout = timeout

    def run(self, samples: Sequence[Sample], settings: Sequence[Setting],
            on_answer: OnAnswer) -> None:
        if self.xargs == "never" and len(settings) != 1:
            raise ValueError("with xargs=never the server decides the setting: give exactly one")
        model, max_model_len = self.served_model()
        check_room_for_answers(samples, max_model_len)
        jobs = [(sample, setting) for setting in settings for sample in samples]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.complete, model, sample, setting): (sample, setting)
                       for sample, setting in jobs}
            for future in as_completed(futures):
                sample, setting = futures[future]
                on_answer(sample, setting, future.result())

    def complete(self, model: str, sample: Sample, setting: Setting) -> str:
        body: dict[str, Any] = {"model": model, "prompt": sample.prompt,
                                "max_tokens": sample.max_new_tokens, "temperature": 0.0}
        if self.xargs == "always" or (self.xargs == "auto" and not setting.dense):
            body["vllm_xargs"] = vllm_xargs(setting)
        return self._request("/v1/completions", body)["choices"][0]["text"]

    def served_model(self) -> tuple[str, int | None]:
        """The model to ask (self.model or the first one listed) and its max_model_len
        as /v1/models reports it (vLLM does; None when the server does not say)."""
        models = self._request("/v1/models")["data"]
        if self.model is None:
            return models[0]["id"], models[0].get("max_model_len")
        entry = next((m for m in models if m["id"] == self.model), {})
        return self.model, entry.get("max_model_len")

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())
