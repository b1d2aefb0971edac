"""The README's main job: serve the bundled model with the plugin and ask it two things."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer


def run_demo(model: str = DEFAULT_MODEL, serve_args: list[str] | None = None) -> None:
    """Start `vllm serve`, send one completion and one chat request, print, shut down."""
    folder = model_path(model)
    args = [*CPU_DEFAULT_ARGS, "--max-model-len", "4096", "--served-model-name", model,
            *(serve_args or [])]
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
    print("server stopped")
