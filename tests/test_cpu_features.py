"""The fast dtype is a pure function of the CPU's feature flags."""

from __future__ import annotations

import pytest

from vllm_kvcompress.cpu_features import cpu_flags, dtype_reason, fast_dtype

AVX2_ONLY = "fpu sse sse2 avx avx2 fma f16c"
AVX512_BF16 = "fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16"
AMX = "avx2 avx512f amx_tile amx_int8 amx_bf16"
ARM_BF16 = "fp asimd evtstrm aes sha2 asimddp sve bf16 i8mm"
ARM_PLAIN = "fp asimd evtstrm aes crc32"


@pytest.mark.parametrize(("flags", "dtype"), [
    (AVX2_ONLY, "float32"),
    ("fpu avx2 avx512f avx512bw", "float32"),  # AVX-512 without its bf16 unit emulates
    (AVX512_BF16, "bfloat16"),
    (AMX, "bfloat16"),
    (ARM_BF16, "bfloat16"),
    (ARM_PLAIN, "float32"),
    ("", "float32"),
])
def test_fast_dtype_from_flags(flags, dtype):
    assert fast_dtype(flags.split()) == dtype
    assert ("natively" in dtype_reason(flags.split())) == (dtype == "bfloat16")


def test_flags_are_read_from_cpuinfo_on_x86_and_arm():
    x86 = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {AVX512_BF16}\n\nprocessor\t: 1\n"
    assert "avx512_bf16" in cpu_flags(x86)
    arm = f"processor\t: 0\nFeatures\t: {ARM_BF16}\nCPU implementer\t: 0x41\n"
    assert cpu_flags(arm) == frozenset(ARM_BF16.split())
    assert cpu_flags("processor\t: 0\n") == frozenset()
