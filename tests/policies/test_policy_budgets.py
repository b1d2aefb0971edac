"""Budget allocators: the published formulas, the promises the page accounting relies on."""

from __future__ import annotations

import pytest
import torch

from policy_batches import make_batch, sub_batch
from vllm_kvcompress.policies import make_policy
from vllm_kvcompress.policies.budgets import (NO_LIMIT, AdaKVAllocator, UniformAllocator,
                                              adakv_budgets, attention_density, d2o_budgets,
                                              d2o_layer_shares, make_allocator, max_layer_budget,
                                              pyramid_budgets)


def test_uniform():
    data = make_batch([10, 20, 30, 40])
    assert UniformAllocator().allocate(data, 17, 4).tolist() == [17] * 4
    assert UniformAllocator().max_layer_budget(17, 4, 32) == 17


def test_pyramid_matches_the_published_formula():
    # C=128, W=32: min = 96 // 20 = 4, max = 192 - 4 = 188, step = (188 - 4) // 31 = 5.
    lengths = torch.tensor([4096])
    budgets = [int(pyramid_budgets(128, 32, layer, 32, lengths)) for layer in range(32)]
    assert budgets == [188 - 5 * layer + 32 for layer in range(32)]
    assert max_layer_budget(128, 32, 32) == 188 + 32 == budgets[0]


@pytest.mark.parametrize("length", [20, 100, 160, 200, 250, 10_000])
@pytest.mark.parametrize(("budget", "window", "layers"), [(128, 32, 32), (64, 8, 7), (40, 39, 4)])
def test_pyramid_shape_and_bound(length, budget, window, layers):
    lengths = torch.tensor([length])
    budgets = [int(pyramid_budgets(budget, window, layer, layers, lengths)) for layer in range(layers)]
    kept = [min(b, length) for b in budgets]
    assert all(a >= b for a, b in zip(kept, kept[1:])), "more in low layers"
    assert max(kept) <= max_layer_budget(budget, window, layers)
    if length > budget:
        assert min(kept) >= window
    else:
        assert kept == [length] * layers, "nothing to compress"


def test_pyramid_clips_to_the_length():
    # L - W = 150 < max = 188: layer 0 keeps everything, min becomes 2 * 96 - 150 = 42.
    lengths = torch.tensor([182])
    assert int(pyramid_budgets(128, 32, 0, 32, lengths)) == 182
    assert int(pyramid_budgets(128, 32, 31, 32, lengths)) == 150 - 31 * ((150 - 42) // 31) + 32


def test_pyramid_degenerate_cases_fall_back_to_uniform():
    lengths = torch.tensor([500, 600])
    assert pyramid_budgets(16, 32, 0, 8, lengths).tolist() == [16, 16]
    assert pyramid_budgets(100, 32, 0, 1, lengths).tolist() == [100, 100]


def adakv_case(seed=0, heads=4, requests=3, length=60):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(requests * heads, length, generator=gen) ** 4
    candidates = torch.ones_like(scores, dtype=torch.bool)
    return scores, candidates


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adakv_sums_to_the_pool_and_applies_the_safeguard(alpha):
    scores, candidates = adakv_case()
    scores[0] *= 100  # head 0 of request 0 dominates the global top
    pools = torch.full((12,), 20)
    shares = adakv_budgets(scores, candidates, pools, 4, alpha)
    assert shares.view(3, 4).sum(dim=1).tolist() == [80, 80, 80]
    assert (shares >= int(alpha * 20)).all()
    if alpha < 1:
        assert shares[0] > 20 and shares[0] <= 20 + (1 - alpha) * 60
    else:
        assert shares.tolist() == [20] * 12


def test_adakv_counts_are_the_global_top_when_alpha_is_zero():
    scores, candidates = adakv_case(seed=3, heads=2, requests=1, length=10)
    pools = torch.tensor([4, 4])
    shares = adakv_budgets(scores, candidates, pools, 2, 0.0)
    top = scores.flatten().topk(8).indices // 10
    assert shares.tolist() == [int((top == 0).sum()), int((top == 1).sum())]


def test_adakv_keeps_everything_when_the_request_fits():
    scores, candidates = adakv_case(heads=2, requests=1, length=10)
    candidates[1, 3:] = False   # head 1 has 3 candidates, head 0 has 10: 13 <= 2 * 8
    shares = adakv_budgets(scores, candidates, torch.tensor([8, 8]), 2, 0.2)
    assert shares.tolist() == [10, 3]


def test_adakv_allocator_request_sum_is_h_times_budget():
    data = make_batch([50, 44, 50, 50, 37, 41], num_kv_heads=3, seed=5)
    policy = make_policy("adakv", window=6)
    window, sinks = policy.protection(20)
    budgets = policy.allocate(data, 20, policy.score(data), window, sinks)
    assert budgets.view(2, 3).sum(dim=1).tolist() == [60, 60]
    assert (budgets >= window + int(0.2 * 14)).all()


def test_adakv_is_per_request():
    data = make_batch([50, 44, 30, 50, 37, 41], num_kv_heads=2, seed=6)
    policy = make_policy("adakv", window=6)
    window, sinks = policy.protection(20)
    together = policy.allocate(data, 20, policy.score(data), window, sinks)
    for request in range(3):
        alone = sub_batch(data, [2 * request, 2 * request + 1], 2)
        assert torch.equal(policy.allocate(alone, 20, policy.score(alone), window, sinks),
                           together[2 * request:2 * request + 2])


def test_pyramid_adakv_composes():
    allocator = make_allocator("pyramid_adakv", alpha=0.2, beta=20)
    assert isinstance(allocator, AdaKVAllocator)
    data = make_batch([300] * 4, num_kv_heads=2, layer=0, num_layers=4)
    policy = make_policy("pyramidkv", window=8, allocator="pyramid_adakv")
    window, sinks = policy.protection(64)
    budgets = policy.allocate(data, 64, policy.score(data), window, sinks)
    layer_budget = int(pyramid_budgets(64, 8, 0, 4, torch.tensor([300])))
    assert budgets.view(2, 2).sum(dim=1).tolist() == [2 * layer_budget] * 2
    assert policy.max_layer_budget(64, 4) == max_layer_budget(64, 8, 4)


def test_attention_density_is_the_mean_variance_over_heads():
    acc = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 5.0]])
    lengths = torch.tensor([2, 3])
    first, second = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 5.0])
    expected = (first.var(unbiased=False) + second.var(unbiased=False)) / 2
    torch.testing.assert_close(attention_density(acc, lengths, 2), expected[None])


def test_d2o_shares_favour_low_density_layers():
    densities = torch.tensor([[5.0, 1.0, 3.0, 2.0, 9.0, 4.0]])
    compressed = [False, True, True, True, True, False]
    shares = d2o_layer_shares(densities, compressed)[0]
    inner = shares[1:5]
    torch.testing.assert_close(inner.mean(), torch.tensor(1.0))
    assert inner.argsort(descending=True).tolist() == [0, 2, 1, 3]   # densities 1 < 2 < 3 < 9
    assert shares[0] == 1 and shares[5] == 1


def test_d2o_budgets_clamp_and_cover_short_streams():
    shares = torch.tensor([1.0, 3.0, 0.001, 1.0])
    lengths = torch.tensor([1000, 1000, 1000, 50])
    assert d2o_budgets(shares, 100, lengths).tolist() == [100, 300, 10, 50]


def test_d2o_allocator_full_layers_and_bound():
    policy = make_policy("d2o")
    assert policy.needs_layer_densities
    assert policy.max_layer_budget(64, 8) == NO_LIMIT
    assert make_policy("d2o", full_layers=[]).max_layer_budget(64, 8) == 64 * 8
    for layer, full in [(0, True), (1, True), (7, True), (3, False)]:
        data = make_batch([200, 180], num_kv_heads=2, layer=layer, num_layers=8)
        window, sinks = policy.protection(64)
        budgets = policy.allocate(data, 64, policy.score(data), window, sinks)
        assert torch.equal(budgets, data.lengths) == full
    data = make_batch([200, 180], num_kv_heads=2)
    data.layer_densities = None
    with pytest.raises(ValueError, match="layer_densities"):
        policy.compress(data, 64)
