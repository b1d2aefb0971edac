"""The worker process's model runner and CompressionRuntime, for the attention backend.

vLLM builds attention backends without a reference to the model runner; the worker class
records it here before the model is loaded, and the metadata builder creates the runtime
on the first step (when the KV tensors exist).
"""

from __future__ import annotations

_runner = None
_runtime = None


def set_runner(runner) -> None:
    global _runner, _runtime
    _runner, _runtime = runner, None


def runner():
    if _runner is None:
        raise RuntimeError("vllm-kvcompress: no model runner registered; compression needs "
                           "the worker class set by engine_setup.enable_compression")
    return _runner


def get():
    return _runtime


def set(runtime) -> None:  # noqa: A001 - mirrors get()
    global _runtime
    _runtime = runtime
