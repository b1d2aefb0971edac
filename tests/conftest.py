"""Shared fixtures: the bundled model, a private temp dir for vLLM's IPC sockets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels are checked in Triton's interpreter. Triton picks
# interpreted or compiled when `triton` is first imported (vLLM imports it), so the switch
# must be set before anything else; vLLM's CPU path does not use Triton either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# vLLM on these CPU machines: a fixed KV cache size (the default NUMA-based check fails
# on small nodes); engine and worker in this process for in-process tests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM writes IPC sockets to the temp dir; keep them in a folder the session removes.
_TMP = tempfile.TemporaryDirectory(prefix="vllm-kvcompress-tests-")
os.environ["TMPDIR"] = _TMP.name
tempfile.tempdir = _TMP.name


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path

    return model_path(DEFAULT_MODEL)
