"""KV bytes per policy and budgets chosen by target memory (eval/memory.py)."""

from __future__ import annotations

import pytest

from vllm_kvcompress.eval.memory import KVShape, budget_for_memory, stream_tokens
from vllm_kvcompress.policies import make_policy

SHAPE = KVShape(num_layers=30, num_kv_heads=3, head_size=64, dtype_bytes=2)


def test_a_full_token_and_a_second_tier_row():
    assert SHAPE.token_bytes == 256
    assert SHAPE.row_fraction(make_policy("snapkv"), 256) == 0.0
    assert SHAPE.row_fraction(make_policy("mikv"), 256) == 64 / 256          # 4 + 2 bits
    assert SHAPE.row_fraction(make_policy("mikv", key_bits=3, value_bits=2), 256) == 56 / 256
    assert SHAPE.row_fraction(make_policy("think"), 256) == 216 / 256        # 39 + 64 channels
    assert SHAPE.row_fraction(make_policy("ems"), 256) == 64 / 256


def test_the_packed_row_size_is_one_formula():
    from vllm_kvcompress.kernels.low_bit import LowBitFormat
    from vllm_kvcompress.policies.selection import LowBitTier

    for head_size in (8, 24, 64, 128):
        for bits in ((1, 1), (3, 2), (3, 3), (8, 8)):
            assert LowBitTier(*bits).row_bytes(head_size) == LowBitFormat(head_size, *bits).row_bytes


def test_stream_tokens_count_both_tiers():
    assert stream_tokens(make_policy("snapkv"), 256, 4096, SHAPE) == 256
    assert stream_tokens(make_policy("snapkv"), 256, 100, SHAPE) == 100
    mikv = make_policy("mikv")
    assert stream_tokens(mikv, 256, 4096, SHAPE) == 256 + 3840 / 4
    capped = make_policy("mikv", lowbit_budget=512)
    assert stream_tokens(capped, 256, 4096, SHAPE) == 256 + 128
    # ems spends half its budget's bytes on 4 + 2-bit rows: 128 whole + 512 rows = 256;
    # a stream within its budget is not compressed at all.
    assert stream_tokens(make_policy("ems"), 256, 4096, SHAPE) == 256
    assert stream_tokens(make_policy("ems"), 2048, 1180, SHAPE) == 1180
    # think narrows all kept tokens but the last 32: 224 rows of 216 bytes + 32 whole.
    assert stream_tokens(make_policy("think"), 256, 4096, SHAPE) == 32 + 224 * 216 / 256


def test_budget_for_memory_is_the_largest_that_fits():
    assert budget_for_memory(make_policy("snapkv"), 0.125, 2048, SHAPE) == 256
    mikv = make_policy("mikv", key_bits=3, value_bits=2)  # rows are 7/32 of a token
    budget = budget_for_memory(mikv, 0.25, 2048, SHAPE)
    assert stream_tokens(mikv, budget, 2048, SHAPE) <= 512 < stream_tokens(mikv, budget + 1, 2048, SHAPE)
    capped = make_policy("mikv", lowbit_budget=512)
    assert budget_for_memory(capped, 0.125, 2048, SHAPE) == 256 - 128


def test_a_tier_too_large_for_the_memory_is_refused():
    with pytest.raises(ValueError, match="at any budget.*25.0%"):
        budget_for_memory(make_policy("mikv"), 0.125, 2048, SHAPE)


def test_the_bundled_models_shape(model_dir):
    assert KVShape.of_model(model_dir) == SHAPE
