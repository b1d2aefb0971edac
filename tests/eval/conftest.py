"""Fixtures shared by the quality-harness tests: one reference runner per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def runner(model_dir):
    from vllm_kvcompress.eval.reference_runner import ReferenceRunner

    return ReferenceRunner(model_dir)


@pytest.fixture(scope="session")
def count_tokens(runner):
    return runner.count_tokens
