"""The profile allocator: each stream its learned share of the budget, by model head index
(tensor parallelism), within the bound the scheduler reserves; refused for another shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from policy_batches import PROFILE_SHARES, make_batch

from vllm_kvcompress.policies import make_policy
from vllm_kvcompress.policies.budgets import ProfileAllocator


def test_each_stream_gets_its_share_of_the_pool():
    allocator = ProfileAllocator(PROFILE_SHARES)
    batch = make_batch([100] * 6, num_kv_heads=2, layer=2)             # 3 requests x 2 heads
    budgets = allocator.allocate(batch, budget=40, reserved=8)
    # layer 2's shares are 2.0 and 0.25 of the 32-slot pool, per request.
    assert budgets.tolist() == [72, 16] * 3
    assert int(budgets.max()) <= allocator.max_layer_budget(40, 8, num_layers=8)


def test_a_tensor_parallel_rank_reads_its_own_heads():
    allocator = ProfileAllocator(PROFILE_SHARES)
    second_head = dataclasses.replace(make_batch([100, 100], num_kv_heads=1, layer=3), first_head=1)
    assert allocator.allocate(second_head, budget=40, reserved=8).tolist() == [24, 24]  # 0.5


def test_streams_within_the_budget_keep_everything():
    allocator = ProfileAllocator(PROFILE_SHARES)
    batch = make_batch([30, 30], num_kv_heads=2, layer=2)
    assert allocator.allocate(batch, budget=40, reserved=8).tolist() == [72, 30]


def test_a_profile_of_another_shape_is_refused():
    allocator = ProfileAllocator([[1.0, 1.0]] * 4)
    with pytest.raises(ValueError, match=r"head_shares is \[4, 2\].*8 layers"):
        allocator.allocate(make_batch([50, 50], num_kv_heads=2), budget=20, reserved=4)


def test_a_policy_with_a_profile_keeps_the_shares_it_was_given():
    policy = make_policy("snapkv", window=4, allocator="profile", head_shares=PROFILE_SHARES)
    batch = make_batch([120] * 4, num_kv_heads=2, layer=0, window=4)
    kept = policy.compress(batch, 36).keep.sum(1)
    assert kept.tolist() == [4 + 16, 4 + 48] * 2   # layer 0: shares 0.5 and 1.5 of 32
