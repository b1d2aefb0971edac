"""The operand dtype and precision of the Triton kernels' tl.dot for a KV dtype."""

from __future__ import annotations

import os

import torch
import triton.language as tl

TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                 torch.float32: tl.float32}


def dot_args(dtype: torch.dtype) -> dict:
    """DOT_DTYPE and PRECISION constexprs for tiles of `dtype`. Triton's interpreter (3.x)
    multiplies bf16 tiles as their raw bits: there they go through float32 instead, so the
    CPU tests check the bf16 path a GPU compiles."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    return dict(DOT_DTYPE=TRITON_DTYPES[dtype],
                PRECISION="ieee" if dtype == torch.float32 else "tf32")
