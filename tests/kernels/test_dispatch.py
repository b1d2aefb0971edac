"""Choosing the implementation: automatic, forced by argument, forced by environment."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.kernels import IMPL_ENV, use_triton


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert not use_triton(torch.zeros(1))


def test_argument_and_environment_force_an_implementation(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(torch.zeros(1), "triton")
    monkeypatch.setenv(IMPL_ENV, "triton")
    assert use_triton(torch.zeros(1))
    assert not use_triton(torch.zeros(1), "torch")
    monkeypatch.setenv(IMPL_ENV, "torch")
    assert not use_triton(torch.zeros(1))


def test_bad_choice_names_the_setting(monkeypatch):
    monkeypatch.setenv(IMPL_ENV, "cuda")
    with pytest.raises(ValueError, match=IMPL_ENV):
        use_triton(torch.zeros(1))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton(torch.zeros(1), "triton")
