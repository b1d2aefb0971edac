"""The README's main job: serve the bundled model with compression and ask it things."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.cpu_features import default_dtype
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

DEFAULT_POLICY_ARGS = ["--kv-policy", "ems", "--budget", "256"]

# A long request, so that compression has something to do: a story with one fact in it.
STORY = ("The caravan crossed the salt flats at dawn, and the drivers sang to keep the camels "
         "moving. Every evening they counted water skins and mended harness by lamplight. ")
FACT = "The caravan's lead camel was called Saffron. "
QUESTION = "\n\nQuestion: What was the lead camel called?\nAnswer: The lead camel was called"


def run_demo(model: str = DEFAULT_MODEL, serve_args: list[str] | None = None) -> None:
    """Start `vllm serve`, send a completion, a chat and a long request, print, shut down."""
    folder = model_path(model)
    policy_args = list(serve_args or [])
    if not any(arg.startswith("--kv-policy") for arg in policy_args):
        policy_args = [*DEFAULT_POLICY_ARGS, *policy_args]
    if not any(arg.startswith("--dtype") for arg in policy_args):
        policy_args = ["--dtype", default_dtype(), *policy_args]
    args = [*CPU_DEFAULT_ARGS, "--max-model-len", "4096", "--served-model-name", model,
            *policy_args]
    log_path = Path(tempfile.gettempdir()) / "vllm-kvcompress-demo.log"
    print(f"$ vllm serve {folder} {' '.join(args)}   (log: {log_path})")
    started = time.monotonic()
    with VllmServer(folder, args, log_path) as server:
        print(f"server healthy after {time.monotonic() - started:.0f} s at {server.url}")
        completion = server.post("/v1/completions", {
            "model": model, "prompt": "The capital of France is",
            "max_tokens": 16, "temperature": 0,
        })
        print(f"completion: 'The capital of France is' -> {completion['choices'][0]['text']!r}")
        chat = server.post("/v1/chat/completions", {
            "model": model, "max_tokens": 32, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        })
        print(f"chat: 'What is the capital of France?' -> "
              f"{chat['choices'][0]['message']['content']!r}")
        _long_request(server, model)
    print("server stopped")


def _long_request(server: VllmServer, model: str) -> None:
    prompt = STORY * 6 + FACT + STORY * 24 + QUESTION
    peak = _MetricsPeak(server)
    with peak:
        reply = server.post("/v1/completions", {"model": model, "prompt": prompt,
                                                "max_tokens": 64, "temperature": 0})
    answer = reply["choices"][0]["text"].split("\n")[0]
    print(f"long request ({reply['usage']['prompt_tokens']} prompt tokens): "
          f"'...What was the lead camel called?' -> {answer!r}")
    if peak.seen is None:
        print("KV memory: no compression on this server (--kv-policy none)")
        return
    print(f"KV memory: {peak.kept:.0f} full-precision tokens kept per KV head and layer of "
          f"{peak.seen} seen -> {peak.bytes_kept / 2**20:.1f} MiB held (both tiers) instead of "
          f"{peak.bytes_seen / 2**20:.1f} MiB with stock vLLM "
          f"({peak.bytes_seen / max(peak.bytes_kept, 1):.1f}x less)")


class _MetricsPeak:
    """Polls /metrics while a request runs; keeps the step with the most tokens seen."""

    def __init__(self, server: VllmServer):
        self.server, self.seen, self.kept = server, None, None
        self.bytes_seen, self.bytes_kept = 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._sample()  # the gauges keep the last step's values

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            self._sample()

    def _sample(self) -> None:
        values = self.server.metrics()
        seen = values.get("vllm:kv_compress_tokens_seen")
        if seen and (self.seen is None or seen >= self.seen):
            self.seen, self.kept = int(seen), values.get("vllm:kv_compress_tokens_kept", seen)
            self.bytes_seen = values.get("vllm:kv_compress_bytes_seen", 0.0)
            self.bytes_kept = values.get("vllm:kv_compress_bytes_kept", 0.0)
