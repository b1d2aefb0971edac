"""Each policy on synthetic streams with planted structure: it keeps what it should and
merges what it should, the way its paper (or our documented definition) says."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from policy_batches import make_batch
from vllm_kvcompress.policies import apply_selection, make_policy
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier


def kept(selection, stream=0) -> set[int]:
    return set(selection.keep[stream].nonzero().squeeze(1).tolist())


def aligned_batch(length=40, heads=1, planted=(10,), window=4, group=2, dim=16, seed=0):
    """Window queries all point along e0; planted keys too (strongly), others are small noise."""
    data = make_batch([length] * heads, num_kv_heads=heads, group=group, head_dim=dim,
                      window=window, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    data.keys = 0.1 * torch.randn(heads, length, dim, generator=gen)
    data.window_queries = 0.1 * torch.randn(heads, group, window, dim, generator=gen)
    data.window_queries[..., 0] += 3.0
    for slot in planted:
        data.keys[:, slot, 0] = 20.0
    return data


def test_streaming_keeps_sinks_and_the_most_recent():
    data = make_batch([30], num_kv_heads=1)
    assert kept(make_policy("streaming").compress(data, 10)) == {0, 1, 2, 3, 24, 25, 26, 27, 28, 29}


def test_h2o_keeps_heavy_hitters_and_the_recent_half():
    data = make_batch([40], num_kv_heads=1, seed=1)
    data.acc_scores[0, [5, 12]] = 50.0
    selection = make_policy("h2o").compress(data, 10)
    heavy = set(data.acc_scores[0, :35].topk(5).indices.tolist())
    assert {5, 12} <= heavy
    assert kept(selection) == heavy | set(range(35, 40))


def test_snapkv_keeps_the_pooled_neighbourhood_of_the_attended_key():
    data = aligned_batch()
    assert kept(make_policy("snapkv", window=4).compress(data, 11)) == set(range(7, 14)) | set(range(36, 40))
    unpooled = make_policy("snapkv", window=4, pool="none").compress(data, 5)
    assert kept(unpooled) == {10, 36, 37, 38, 39}


def test_pyramidkv_gives_low_layers_more():
    counts = []
    for layer in (0, 3, 7):
        data = aligned_batch(length=200, planted=(50,))
        data.layer, data.num_layers = layer, 8
        selection = make_policy("pyramidkv", window=4).compress(data, 24)
        assert 50 in kept(selection)
        counts.append(int(selection.kept_counts()))
    assert counts[0] > counts[1] > counts[2]
    assert counts[0] <= make_policy("pyramidkv", window=4).max_layer_budget(24, 8)


def test_adakv_moves_budget_from_a_focused_head_to_a_diffuse_one():
    data = aligned_batch(heads=2, planted=())
    data.keys[0, 10, 0] = 20.0                  # head 0: one key takes all the attention
    data.keys[1] = data.keys[1, :1]             # head 1: identical keys, uniform attention
    selection = make_policy("adakv", window=4, pool="none").compress(data, 12)
    counts = selection.kept_counts().tolist()
    assert sum(counts) == 24 and counts[0] < counts[1]
    assert 10 in kept(selection, 0)


def ems_batch():
    data = make_batch([30], num_kv_heads=1, head_dim=32, window=4, seed=7)
    gen = torch.Generator().manual_seed(8)
    data.keys = torch.randn(1, 30, 32, generator=gen)
    centre = data.keys[0, 15].clone()
    data.keys[0, 20] = centre + 0.05 * torch.randn(32, generator=gen)
    data.keys[0, 21] = centre + 0.05 * torch.randn(32, generator=gen)
    data.acc_scores[0] = 0.5
    data.acc_scores[0, 15] = 100.0
    data.acc_scores[0, [20, 21]] = 0.01
    return data


def test_ems_merges_similar_evicted_keys_into_their_centre():
    data = ems_batch()
    # The planted centre is important by accumulated attention: the global score's part.
    policy = make_policy("ems", window=4, global_weight=1.0, pool="none", lowbit_share=0.0)
    selection = policy.compress(data, 11)
    assert 15 in kept(selection) and not {20, 21} & kept(selection)
    assert selection.merge_into[0, 20] == 15 and selection.merge_into[0, 21] == 15
    members = (selection.merge_into[0] == 15).nonzero().squeeze(1)
    assert set(members.tolist()) == {15, 20, 21}
    evicted = ~selection.keep[0] & (selection.merge_into[0] < 0)
    assert evicted.sum() == 30 - 11 - 2, "dissimilar tokens fall in the zero class"
    weights = selection.weights[0, members]
    torch.testing.assert_close(weights, policy.score(data)[0, members])
    out = apply_selection(data, selection)
    row = sorted(kept(selection)).index(15)
    expected = (weights[:, None] * data.values[0, members]).sum(0) / weights.sum()
    torch.testing.assert_close(out.values[0, row], expected)
    torch.testing.assert_close(out.acc_scores[0, row], data.acc_scores[0, members].sum())


def test_ems_demotes_its_zero_class_within_the_budgets_bytes():
    data = ems_batch()
    policy = make_policy("ems", window=4, global_weight=1.0, pool="none")   # lowbit_share 0.5
    selection = policy.compress(data, 22)
    # Half the budget at full precision, the rest as 4 + 2-bit rows (40 bytes against 128
    # for a 16-bit token of 32 channels): 11 tokens' bytes hold 35 rows.
    assert policy.full_budget(22) == 11 and selection.keep[0].sum() == 11
    assert selection.second_tier == LowBitTier(4, 2, cap=11 * 128 // 40)
    assert policy.second_tier_for(22, 32) == selection.second_tier
    merged = ~selection.keep[0] & (selection.merge_into[0] >= 0)
    assert torch.equal(selection.demote[0], data.live_mask()[0] & ~selection.keep[0] & ~merged)
    assert policy.max_layer_budget(22, 8) == 11
    assert make_policy("ems", lowbit_share=0.0).second_tier_for(22, 32) is None


def test_merges_reach_at_most_max_merge_span_positions():
    data = make_batch([60], num_kv_heads=1, head_dim=8, window=4, seed=2)
    data.acc_scores[0] = torch.linspace(0.1, 1.0, 60)
    data.acc_scores[0, :4] = 10.0
    reach = {}
    for span in (None, 8):
        selection = make_policy("elastic", max_merge_span=span).compress(data, 10)
        members = (~selection.keep[0] & (selection.merge_into[0] >= 0)).nonzero().squeeze(1)
        distance = (data.positions[0, members]
                    - data.positions[0, selection.merge_into[0, members]]).abs()
        reach[span] = int(distance.max())
    assert reach[8] == 8 and reach[None] > 40


def test_kvmerger_merges_a_run_of_similar_keys_into_its_most_attended_member():
    gen = torch.Generator().manual_seed(3)
    data = make_batch([30], num_kv_heads=1, head_dim=32, seed=3)
    data.keys = torch.randn(1, 30, 32, generator=gen)
    base = 5 * torch.randn(32, generator=gen)
    for slot in range(10, 15):
        data.keys[0, slot] = base + 0.3 * torch.randn(32, generator=gen)
    data.acc_scores[0, 10:15] = torch.tensor([1.0, 1.0, 5.0, 1.0, 1.0])
    policy = make_policy("kvmerger", window=4)
    selection = policy.compress(data, 14)
    assert 12 in kept(selection) and not set(range(10, 15)) - {12} & kept(selection)
    assert selection.merge_into[0, 10:15].tolist() == [12] * 5
    members = torch.tensor([10, 11, 13, 14])
    distance = ((data.keys[0, members] - data.keys[0, 12]) ** 2).sum(-1)
    expected = torch.exp(-distance / (2 * distance.mean()))
    torch.testing.assert_close(selection.weights[0, members], expected)
    assert selection.weights[0, 12] == 1
    # Layers 0, 1 and the last only evict.
    data.layer = 0
    assert policy.compress(data, 14).merge_into is None


def test_d2o_recalls_similar_evicted_tokens_with_the_unnormalised_average():
    data = ems_batch()
    policy = make_policy("d2o", window=4, allocator="uniform")
    selection = policy.compress(data, 11)
    assert not selection.normalize_merges
    keep = selection.keep[0]
    evicted = data.live_mask()[0] & ~keep
    centre_of = selection.merge_into[0]
    unit = F.normalize(data.keys[0], dim=-1)
    cosine = unit @ unit.T
    best = torch.where(keep[None, :], cosine, -torch.inf).max(dim=1).values
    tau = best[evicted].mean()
    assert torch.equal(evicted & (centre_of >= 0), evicted & (best >= tau) & (best > 0))
    assert centre_of[20] == 15 and centre_of[21] == 15
    out = apply_selection(data, selection)
    members = (evicted & (centre_of == 15)).nonzero().squeeze(1)
    expected = (data.keys[0, 15] + (best[members, None] * data.keys[0, members]).sum(0)) / (1 + len(members))
    torch.testing.assert_close(out.keys[0, sorted(kept(selection)).index(15)], expected)


def test_cam_merges_values_of_evicted_tokens_into_the_next_ones():
    data = make_batch([30], num_kv_heads=1, seed=2)
    data.acc_scores[0] = 0.0
    data.acc_scores[0, :5] = 1.0
    data.acc_scores[0, 25:] = 1.0
    data.acc_scores[0, [22, 23, 24]] = 2.0      # A_e / max kept A >= 1: always merged
    policy = make_policy("cam")
    selection = policy.compress(data, 10)
    assert kept(selection) == set(range(5)) | set(range(25, 30))
    out = apply_selection(data, selection)
    values = data.values[0]
    assert torch.equal(out.keys[0], data.keys[0, sorted(kept(selection))])
    expected = {25: values[22] + values[23] + values[24], 26: values[22] + values[23] + values[24],
                27: values[23] + values[24], 28: values[24]}
    for slot, added in expected.items():
        torch.testing.assert_close(out.values[0, 5 + slot - 25], values[slot] + added / 4)
    assert torch.equal(out.values[0, 9], values[29])


def test_cam_draws_are_seeded_bernoulli():
    data = make_batch([400], num_kv_heads=1, seed=2)
    data.acc_scores[0] = 0.5
    data.acc_scores[0, :100] = 1.0               # evicted tokens merge with probability 0.5
    # Kept: slots 0..99 and 300..399; every evicted slot reaches 300 within 400 tokens.
    sources = [(policy.compress(data, 200).value_merge_into[0] >= 0).any(dim=1)
               for policy in (make_policy("cam", merge_tokens=400, seed=s) for s in (0, 0, 1))]
    assert torch.equal(sources[0], sources[1]) and not torch.equal(sources[0], sources[2])
    assert 60 < int(sources[0].sum()) < 140


def test_elastic_merges_into_the_nearest_kept_token_by_position():
    data = make_batch([12, 12], num_kv_heads=2, seed=4)
    data.acc_scores[:] = 0.1
    data.acc_scores[0, 4] = 9.0                  # mean over the two heads decides
    data.acc_scores[1, 7] = 9.0
    selection = make_policy("elastic", window=2, sinks=1).compress(data, 5)
    assert kept(selection, 0) == kept(selection, 1) == {0, 4, 7, 10, 11}
    anchors = selection.merge_into[0].tolist()
    assert anchors == [0, 0, 0, 4, 4, 4, 7, 7, 7, 10, 10, 11]   # slot 2: tie -> earlier
    out = apply_selection(data, selection)
    torch.testing.assert_close(out.keys[0, 1], data.keys[0, 3:6].mean(0))


def test_think_narrows_kept_keys_to_the_channels_queries_use_but_the_recent_ones():
    data = make_batch([40, 6], num_kv_heads=2, head_dim=8, window=4, seed=5)
    data.window_queries[..., [2, 5]] = 0.0
    policy = make_policy("think", window=4, pruning_ratio=0.25, recent=4)
    selection = policy.compress(data, 12)
    assert selection.key_scales[0].tolist() == [1, 1, 0, 1, 1, 0, 1, 1]
    assert selection.second_tier == NarrowKeyTier(0.25)
    assert kept(selection) == kept(make_policy("snapkv", window=4).compress(data, 12))
    assert set(selection.narrow[0].nonzero().squeeze(1).tolist()) == kept(selection) - set(range(36, 40))
    assert selection.narrow[1].tolist()[:6] == [True, True, False, False, False, False]  # within budget
    out = apply_selection(data, selection)
    assert (out.keys[0, :8, [2, 5]] == 0).all()
    assert torch.equal(out.keys[0, 8:12], data.keys[0, 36:40])


def test_mikv_keeps_the_base_at_full_precision_and_demotes_the_rest():
    data = make_batch([40, 9], num_kv_heads=2, head_dim=16, seed=6)
    data.acc_scores[0] = torch.linspace(1.0, 0.1, 40)   # earlier = heavier
    selection = make_policy("mikv", base="h2o").compress(data, 12)
    # Full precision: H2O at the budget (6 heavy, 6 recent); every other token demoted.
    assert kept(selection) == {*range(6), *range(34, 40)}
    assert set(selection.demote[0].nonzero().squeeze(1).tolist()) == set(range(6, 34))
    assert kept(selection, 1) == set(range(9)) and not selection.demote[1, :9].any()
    torch.testing.assert_close(selection.demote_scores[0], data.acc_scores[0])
    assert selection.second_tier == make_policy("mikv").second_tier
    queries = data.window_queries[0].abs().amax(dim=(0, 1))
    keys = data.keys[0].abs().amax(dim=0)
    torch.testing.assert_close(selection.key_scales[0], (queries / keys).sqrt())


def test_mikv_does_not_demote_what_its_base_merges():
    data = make_batch([40], num_kv_heads=1, head_dim=16, seed=7, key_bias=3.0)
    selection = make_policy("mikv", base="ems").compress(data, 12)
    merged = (selection.merge_into >= 0) & ~selection.keep
    assert merged.any()
    assert not (selection.demote & merged).any()
    assert torch.equal(selection.demote | merged | selection.keep, data.live_mask())