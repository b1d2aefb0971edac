"""KV bytes per policy and budgets chosen by target memory (eval/memory.py)."""

from __future__ import annotations

import pytest

from vllm_kvcompress.eval.memory import KVShape, budget_for_memory, stream_tokens
from vllm_kvcompress.policies import make_policy

SHAPE = KVShape(num_layers=30, num_kv_heads=3, head_size=64, dtype_bytes=2)


def test_a_full_token_and_a_low_bit_row():
    assert SHAPE.token_bytes == 256
    assert SHAPE.row_fraction(make_policy("snapkv")) == 0.0
    assert SHAPE.row_fraction(make_policy("mikv")) == 64 / 256          # 3 + 3 bits
    assert SHAPE.row_fraction(make_policy("mikv", value_bits=2)) == 56 / 256


def test_stream_tokens_count_both_tiers():
    assert stream_tokens(make_policy("snapkv"), 256, 4096, SHAPE) == 256
    assert stream_tokens(make_policy("snapkv"), 256, 100, SHAPE) == 100
    mikv = make_policy("mikv")
    assert stream_tokens(mikv, 256, 4096, SHAPE) == 256 + 3840 / 4
    capped = make_policy("mikv", lowbit_budget=512)
    assert stream_tokens(capped, 256, 4096, SHAPE) == 256 + 128


def test_budget_for_memory_is_the_largest_that_fits():
    assert budget_for_memory(make_policy("snapkv"), 0.125, 2048, SHAPE) == 256
    mikv = make_policy("mikv", value_bits=2)              # rows are 7/32 of a token
    budget = budget_for_memory(mikv, 0.25, 2048, SHAPE)
    assert stream_tokens(mikv, budget, 2048, SHAPE) <= 512 < stream_tokens(mikv, budget + 1, 2048, SHAPE)
    capped = make_policy("mikv", lowbit_budget=512)
    assert budget_for_memory(capped, 0.125, 2048, SHAPE) == 256 - 128


def test_a_tier_too_large_for_the_memory_is_refused():
    with pytest.raises(ValueError, match="at any budget.*25.0%"):
        budget_for_memory(make_policy("mikv"), 0.125, 2048, SHAPE)


def test_the_bundled_models_shape(model_dir):
    assert KVShape.of_model(model_dir) == SHAPE
