"""make_policy, the registry, options and apply_selection's exact semantics."""

from __future__ import annotations

import pytest
import torch

from policy_batches import make_batch
from vllm_kvcompress.policies import Selection, apply_selection, implemented_policies, make_policy
from vllm_kvcompress.policies.apply import demoted
from vllm_kvcompress.policies.registry import KNOWN_POLICIES
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier


def test_every_known_policy_is_implemented():
    assert set(implemented_policies()) == set(KNOWN_POLICIES) - {"none"}


def test_published_defaults():
    snapkv = make_policy("snapkv")
    assert (snapkv.window, snapkv.sinks) == (32, 0)
    assert (snapkv.options["pool"], snapkv.options["pool_kernel"]) == ("max", 7)
    assert make_policy("streaming").sinks == 4
    assert make_policy("h2o").protection(256) == (128, 0)
    assert make_policy("h2o", heavy_ratio=0.3, recent_ratio=0.1).protection(100) == (25, 0)
    assert make_policy("pyramidkv").options["beta"] == 20
    assert make_policy("adakv").options["alpha"] == 0.2
    assert make_policy("cam").protection(100) == (50, 50)
    assert make_policy("cam", sinks=4).protection(100) == (96, 4)
    elastic = make_policy("elastic")
    assert (elastic.window, elastic.sinks) == (24, 4)
    d2o = make_policy("d2o")
    assert d2o.sinks == 4 and d2o.options["full_layers"] == (0, 1, -1)
    think = make_policy("think")
    assert (think.base.name, think.options["pruning_ratio"], think.options["recent"]) == ("snapkv", 0.4, 32)
    mikv = make_policy("mikv")
    assert (mikv.base.name, mikv.query_window) == ("snapkv", 32)
    assert mikv.second_tier == LowBitTier(key_bits=4, value_bits=2, cap=None)
    assert make_policy("mikv", lowbit_budget=500, key_bits=3).second_tier == LowBitTier(3, 2, 500)
    assert make_policy("snapkv").second_tier is None


def test_signals_each_policy_asks_for():
    assert not make_policy("streaming").needs_accumulated
    assert make_policy("h2o").needs_accumulated and not make_policy("h2o").needs_window_queries
    assert make_policy("snapkv").query_window == 32
    assert not make_policy("ems").needs_accumulated and make_policy("ems").query_window == 32
    assert make_policy("ems", global_weight=0.5).needs_accumulated
    think = make_policy("think", base="h2o", recent=48)
    assert think.needs_window_queries and think.needs_accumulated and think.query_window == 48
    assert make_policy("think", window=64).query_window == 64
    assert not make_policy("mikv", base="h2o", outlier_balancing=False).needs_window_queries
    assert make_policy("mikv", base="h2o").query_window == 32
    assert not make_policy("d2o", allocator="uniform").needs_layer_densities


def test_unknown_policy_and_none():
    with pytest.raises(ValueError, match="unknown policy 'snapk'"):
        make_policy("snapk")
    with pytest.raises(ValueError, match="no compression"):
        make_policy("none")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        make_policy("snapkv", kernel=7)
    message = str(error.value)
    assert "'kernel'" in message and "'snapkv'" in message
    assert "pool_kernel" in message and "allocator" in message
    with pytest.raises(ValueError, match="allocator='pyramid': must be one of: uniform, profile "
                                         r"\(policy 'cam'\)"):
        make_policy("cam", allocator="pyramid")
    with pytest.raises(ValueError, match="allocator=profile needs kv_policy_args.head_shares"):
        make_policy("cam", allocator="profile")
    with pytest.raises(ValueError, match="head_shares=.*a list per layer of positive numbers"):
        make_policy("cam", allocator="profile", head_shares=[[1.0, 0.0]])


def test_unknown_option_of_a_composed_policy_names_the_base():
    with pytest.raises(ValueError) as error:
        make_policy("think", base="h2o", pool_kernel=5)
    message = str(error.value)
    assert "'pool_kernel'" in message and "'h2o'" in message and "base of 'think'" in message
    assert make_policy("think", pool_kernel=5).base.options["pool_kernel"] == 5


@pytest.mark.parametrize(("name", "options", "fragment"), [
    ("snapkv", {"pool_kernel": 4}, "odd integer"),
    ("snapkv", {"pool_kernel": True}, "odd integer"),
    ("snapkv", {"pool": "median"}, "one of: max, avg, none"),
    ("snapkv", {"allocator": "d2o"}, "one of: uniform, pyramid, adakv, pyramid_adakv"),
    ("adakv", {"alpha": 1.5}, "<= 1.0"),
    ("pyramidkv", {"beta": 0}, ">= 1"),
    ("h2o", {"heavy_ratio": 0}, "> 0.0"),
    ("ems", {"merge_threshold": float("nan")}, "a number"),
    ("kvmerger", {"sigma": -1.0}, "> 0.0"),
    ("kvmerger", {"unmerged_layers": "0,1"}, "list of layer indices"),
    ("cam", {"merge_tokens": 0}, ">= 1"),
    ("think", {"base": "think"}, "one of: snapkv"),
    ("think", {"pruning_ratio": 1.0}, "< 1.0"),
    ("mikv", {"key_bits": 0}, ">= 1 and <= 8"),
    ("mikv", {"value_bits": 9}, ">= 1 and <= 8"),
    ("mikv", {"lowbit_budget": -1}, ">= 0 (or null)"),
    ("mikv", {"base": "mikv"}, "one of: snapkv"),
    ("mikv", {"outlier_balancing": "yes"}, "true or false"),
])
def test_bad_option_values(name, options, fragment):
    key = next(iter(options))
    with pytest.raises(ValueError, match=f"kv_policy_args.{key}=") as error:
        make_policy(name, **options)
    assert fragment in str(error.value)


def test_bad_window_sinks_and_budget():
    with pytest.raises(ValueError, match="window=-1"):
        make_policy("snapkv", window=-1)
    with pytest.raises(ValueError, match="sinks=2.5"):
        make_policy("h2o", sinks=2.5)
    with pytest.raises(ValueError, match="budget=0"):
        make_policy("h2o").compress(make_batch([5, 5]), 0)


# ---------------------------------------------------------------------------- apply_selection

def one_stream(length=6, width=None, dim=2):
    width = width or length
    data = make_batch([length], num_kv_heads=1, head_dim=dim, window=2, pad_to=width)
    data.keys = torch.arange(width * dim, dtype=torch.float32).view(1, width, dim) + 1
    data.values = -data.keys
    data.acc_scores = torch.arange(width, dtype=torch.float32)[None] + 1
    return data


def test_class_merges_are_weighted_means_and_sum_acc():
    data = one_stream()
    selection = Selection(keep=torch.tensor([[True, False, True, False, False, True]]),
                          merge_into=torch.tensor([[0, 0, 2, 2, -1, 5]]),
                          weights=torch.tensor([[1.0, 3.0, 2.0, 0.0, 9.0, 7.0]]))
    out = apply_selection(data, selection)
    keys, acc = data.keys[0], data.acc_scores[0]
    assert out.lengths.tolist() == [3]
    assert out.positions[0].tolist() == data.positions[0, [0, 2, 5]].tolist()
    torch.testing.assert_close(out.keys[0, 0], (keys[0] + 3 * keys[1]) / 4)
    torch.testing.assert_close(out.values[0, 0], -(keys[0] + 3 * keys[1]) / 4)
    assert torch.equal(out.keys[0, 1], keys[2])                   # member of weight 0
    assert torch.equal(out.keys[0, 2], keys[5])                   # no members: untouched
    assert out.acc_scores[0].tolist() == [acc[0] + acc[1], acc[2] + acc[3], acc[5]]
    # Total attention is conserved except for evicted slots.
    torch.testing.assert_close(out.acc_scores.sum(), acc.sum() - acc[4])


def test_zero_weight_class_and_unnormalised_merges():
    data = one_stream()
    keep = torch.tensor([[True, False, True, False, False, True]])
    merge_into = torch.tensor([[0, 0, 2, 2, -1, 5]])
    zero = Selection(keep=keep, merge_into=merge_into, weights=torch.tensor([[0.0, 0.0, 1, 1, 1, 1]]))
    assert torch.equal(apply_selection(data, zero).keys[0, 0], data.keys[0, 0])
    raw = Selection(keep=keep, merge_into=merge_into, normalize_merges=False,
                    weights=torch.tensor([[0.5, 0.25, 1, 1, 1, 1]]))
    keys = data.keys[0]
    torch.testing.assert_close(apply_selection(data, raw).keys[0, 0], 0.5 * keys[0] + 0.25 * keys[1])


def test_members_pointing_at_evicted_slots_are_dropped():
    data = one_stream()
    selection = Selection(keep=torch.tensor([[True, False, False, False, False, True]]),
                          merge_into=torch.tensor([[0, 2, -1, -1, -1, 5]]))
    out = apply_selection(data, selection)
    assert torch.equal(out.keys[0, :2], data.keys[0, [0, 5]])


def test_value_only_merges_leave_keys_and_scores():
    data = one_stream()
    targets = torch.full((1, 6, 2), -1)
    targets[0, 1] = torch.tensor([2, 3])      # 3 is not kept: ignored
    targets[0, 4] = torch.tensor([5, 2])
    weights = torch.zeros(1, 6, 2)
    weights[0, 1] = 0.5
    weights[0, 4] = torch.tensor([0.25, 1.0])
    selection = Selection(keep=torch.tensor([[True, False, True, False, False, True]]),
                          value_merge_into=targets, value_merge_weights=weights)
    out = apply_selection(data, selection)
    values = data.values[0]
    assert torch.equal(out.keys[0, :3], data.keys[0, [0, 2, 5]])
    assert torch.equal(out.acc_scores[0, :3], data.acc_scores[0, [0, 2, 5]])
    torch.testing.assert_close(out.values[0, 1], values[2] + 0.5 * values[1] + values[4])
    torch.testing.assert_close(out.values[0, 2], values[5] + 0.25 * values[4])
    assert torch.equal(out.values[0, 0], values[0])


def test_demoted_slots_are_live_and_never_kept():
    data = make_batch([8, 5], num_kv_heads=2, head_dim=16, seed=3)
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, :2] = True
    demote = torch.ones(2, 8, dtype=torch.bool)
    selection = Selection(keep=keep, demote=demote, second_tier=LowBitTier(3, 3))
    assert demoted(data, selection).sum(dim=1).tolist() == [6, 3]
    out = apply_selection(data, selection)   # the full tier only: demoted slots leave it
    assert out.lengths.tolist() == [2, 2]
    assert not demoted(data, Selection(keep=keep)).any()


def test_low_tier_cap_keeps_the_highest_ranks():
    ranks = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.3]])
    candidates = torch.tensor([[True, True, True, True, False]])
    assert LowBitTier(3, 3).survivors(ranks, candidates).tolist() == [[True, True, True, True, False]]
    kept = LowBitTier(3, 3, cap=2).survivors(ranks, candidates)
    assert kept.tolist() == [[False, True, False, True, False]]   # ties: the earlier column
    assert not LowBitTier(3, 3, cap=0).survivors(ranks, candidates).any()


def test_channel_pruning_only_on_narrow_slots():
    data = one_stream(dim=4)
    scales = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    narrow = torch.tensor([[True, True, True, True, False, False]])
    selection = Selection(keep=torch.ones(1, 6, dtype=torch.bool), narrow=narrow,
                          key_scales=scales, second_tier=NarrowKeyTier(0.5))
    out = apply_selection(data, selection)
    assert (out.keys[0, :4, 1] == 0).all() and (out.keys[0, :4, 3] == 0).all()
    assert torch.equal(out.keys[0, :4, ::2], data.keys[0, :4, ::2])
    assert torch.equal(out.keys[0, 4:], data.keys[0, 4:])
    assert torch.equal(out.values, data.values)


def test_compaction_layout_and_max_len():
    data = make_batch([5, 3], num_kv_heads=2, window=2)
    keep = torch.tensor([[False, True, False, True, True], [True, False, True, False, False]])
    out = apply_selection(data, Selection(keep=keep), max_len=7)
    assert out.keys.shape[1] == 7 and out.lengths.tolist() == [3, 2]
    assert torch.equal(out.keys[0, :3], data.keys[0, [1, 3, 4]])
    assert torch.equal(out.keys[1, :2], data.keys[1, [0, 2]])
    assert (out.keys[0, 3:] == 0).all() and (out.positions[1, 2:] == -1).all()
    assert (out.acc_scores[1, 2:] == 0).all()
    assert out.window_queries is data.window_queries and out.layer_densities is data.layer_densities
