"""Which implementation of a kernel op runs: the torch reference or Triton.

Default ("auto"): Triton when the tensors are on CUDA and triton imports, the torch
reference otherwise. The environment variable VLLM_KVCOMPRESS_KERNELS ("auto", "torch",
"triton") or an op's `impl` argument forces one. Triton on CPU tensors runs only in
Triton's interpreter (TRITON_INTERPRET=1 set before the first kernel module is imported),
which is how the tests compare the two implementations without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

IMPL_ENV = "VLLM_KVCOMPRESS_KERNELS"
IMPLS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def requested_impl(impl: str | None = None) -> str:
    """The implementation asked for: `impl`, else VLLM_KVCOMPRESS_KERNELS, else "auto"."""
    choice = impl or os.environ.get(IMPL_ENV, "auto")
    if choice not in IMPLS:
        raise ValueError(f"kernel implementation {choice!r} (from impl= or {IMPL_ENV}) "
                         f"is not one of {', '.join(IMPLS)}")
    return choice


def use_triton(tensor: torch.Tensor, impl: str | None = None) -> bool:
    """True when the op should run its Triton kernel on `tensor`'s device."""
    choice = requested_impl(impl)
    if choice == "torch":
        return False
    if choice == "auto":
        return tensor.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("Triton kernels were forced but triton does not import")
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 "
                           "(set before the kernels are first used)")
    return True
