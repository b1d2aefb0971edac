"""The compute dtype that is fast on this machine, chosen from the CPU's feature flags.

vLLM's CPU kernels compute bf16 natively with AVX-512 BF16 or AMX (x86) or the BF16
extension (Arm). Without them bf16 is emulated, and one 4,096-token prompt took about ten
times as long as on a CPU with native bf16; float32 is faster there (docs/benchmarks.md,
"Fast defaults on every CPU"). With CUDA, bf16.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def fast_dtype(flags: Iterable[str]) -> str:
    """"bfloat16" if the flags include a native bf16 unit, else "float32"."""
    return "bfloat16" if NATIVE_BF16_FLAGS & set(flags) else "float32"


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags in /proc/cpuinfo's text ("flags" on x86, "Features" on Arm)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def default_dtype() -> str:
    """The fast dtype of this machine; the first call says which and why on stderr (the
    demo, the eval harness and the benchmarks use it when no --dtype is given)."""
    import torch

    if torch.cuda.is_available():
        dtype, reason = "bfloat16", "CUDA"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        flags = cpu_flags(cpuinfo.read_text()) if cpuinfo.exists() else frozenset()
        dtype, reason = fast_dtype(flags), dtype_reason(flags)
    print(f"vllm-kvcompress: dtype {dtype} ({reason})", file=sys.stderr)
    return dtype


def dtype_reason(flags: Iterable[str]) -> str:
    native = sorted(NATIVE_BF16_FLAGS & set(flags))
    if native:
        return f"this CPU computes bf16 natively: {', '.join(native)}"
    return "this CPU has no native bf16 (avx512_bf16, amx_bf16 or Arm bf16): bf16 would be emulated"
