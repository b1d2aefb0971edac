"""Properties every policy keeps: budgets, protection, the Selection contract, ragged
batching (batched = one request or one stream at a time), padding that changes nothing,
and budget >= length changes nothing."""

from __future__ import annotations

import pytest
import torch

from policy_batches import (CASES, IDS, assert_same_selection, assert_same_streams, make_batch,
                            selection_rows, sub_batch, with_garbage_padding)
from vllm_kvcompress.policies import apply_selection, make_policy
from vllm_kvcompress.policies.base import ComposedPolicy
from vllm_kvcompress.policies.ranking import protected_mask
from vllm_kvcompress.policies.budgets import AdaKVAllocator, ProfileAllocator

LENGTHS = [40, 35, 22, 29, 40, 40, 9, 17]       # 4 requests x 2 KV heads, ragged
BUDGET = 16
WINDOW = 6


def build(name, options):
    return make_policy(name, window=WINDOW, **options)


def batch(**kwargs):
    return make_batch(LENGTHS, num_kv_heads=2, key_bias=2.0, gaps=True, **kwargs)


def head_coupled(policy) -> bool:
    """Whether a stream's result depends on the other heads of its request (or, for a
    budget profile, on which head it is)."""
    inner = policy.base if isinstance(policy, ComposedPolicy) else policy
    return (isinstance(inner.allocator, (AdaKVAllocator, ProfileAllocator))
            or inner.name == "elastic")


def merges(policy) -> bool:
    selection = policy.compress(batch(), BUDGET)
    return selection.merge_into is not None or selection.value_merge_into is not None


def cases_where(predicate) -> list:
    """The CASES whose policy satisfies `predicate`, with their ids."""
    return [pytest.param(name, options, id=case_id) for (name, options), case_id
            in zip(CASES, IDS) if predicate(build(name, options))]


def budgets_of(policy, data, budget):
    """Each stream's share of what `budget` keeps at full precision."""
    window, sinks = policy.protection(budget)
    return policy.allocate(data, policy.full_budget(budget), policy.score(data), window, sinks)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_selection_contract(name, options):
    policy = build(name, options)
    data = batch()
    budgets = budgets_of(policy, data, BUDGET)
    selection = policy.compress(data, BUDGET)
    live = data.live_mask()
    keep = selection.keep
    slots = torch.arange(data.max_len)[None, :].expand_as(keep)

    assert not (keep & ~live).any()
    assert (selection.kept_counts() <= budgets).all()
    assert torch.equal(selection.kept_counts(), torch.minimum(data.lengths, budgets))
    protected = protected_mask(data, *policy.protection(BUDGET))
    fits = (protected.sum(dim=1) <= budgets)[:, None]
    assert not (protected & fits & ~keep).any(), "a protected slot was dropped"
    within = (data.lengths <= budgets)[:, None]
    assert not (live & within & ~keep).any(), "a stream within budget lost a slot"

    if selection.merge_into is not None:
        target = selection.merge_into
        assert torch.equal(target[keep], slots[keep]), "kept slots are their own centre"
        member = live & ~keep & (target >= 0)
        assert keep.gather(1, target.clamp(min=0))[member].all(), "members merge into kept slots"
        weights = selection.weights
        assert weights is None or (weights[live] >= 0).all()
    if selection.value_merge_into is not None:
        target = selection.value_merge_into
        used = target >= 0
        assert not (used & ~live[..., None]).any()
        assert keep.gather(1, target.clamp(min=0).flatten(1)).view_as(target)[used].all()
        assert (selection.value_merge_weights[used] > 0).all()

    out = apply_selection(data, selection)
    assert torch.equal(out.lengths, selection.kept_counts())
    for n in range(data.num_streams):
        assert torch.equal(out.positions[n, :out.lengths[n]], data.positions[n][keep[n]])


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_budget_covering_every_stream_changes_nothing(name, options):
    policy = build(name, options)
    data = batch()
    budget = max(LENGTHS) + 3
    while policy.full_budget(budget) < max(LENGTHS) + 3:   # ems spends some on a low-bit tier
        budget *= 2
    selection = policy.compress(data, budget)
    assert torch.equal(selection.keep, data.live_mask())
    out = apply_selection(data, selection)
    live = data.live_mask()
    assert torch.equal(out.lengths, data.lengths)
    keys = data.keys
    if selection.narrow is not None:   # ThinK prunes key channels whatever the budget
        pruned = selection.narrow[..., None] & (selection.key_scales == 0)[:, None, :]
        keys = keys.masked_fill(pruned, 0.0)
    assert torch.equal(out.keys[live], keys[live])
    assert torch.equal(out.values[live], data.values[live])
    assert torch.equal(out.acc_scores[live], data.acc_scores[live])
    assert torch.equal(out.positions[live], data.positions[live])


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
@pytest.mark.parametrize("extra", [0, 5])
def test_padding_content_changes_nothing(name, options, extra):
    policy = build(name, options)
    data = batch()
    garbage = with_garbage_padding(data, extra=extra)
    clean = policy.compress(data, BUDGET)
    dirty = policy.compress(garbage, BUDGET)
    live = data.live_mask()
    streams = range(data.num_streams)
    assert_same_selection(selection_rows(clean, streams, data.max_len),
                          selection_rows(dirty, streams, data.max_len), live)
    assert_same_streams(apply_selection(data, clean), apply_selection(garbage, dirty))


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_batched_equals_one_request_at_a_time(name, options):
    policy = build(name, options)
    data = batch()
    together = policy.compress(data, BUDGET)
    heads = data.num_kv_heads
    for request in range(data.num_requests):
        streams = list(range(request * heads, (request + 1) * heads))
        alone_batch = sub_batch(data, streams, heads)
        alone = policy.compress(alone_batch, BUDGET)
        width = alone_batch.max_len
        assert_same_selection(selection_rows(together, streams, width),
                              selection_rows(alone, range(heads), width), alone_batch.live_mask())


# Head-coupled policies are covered one request at a time (above).
@pytest.mark.parametrize(("name", "options"), cases_where(lambda p: not head_coupled(p)))
def test_batched_equals_one_stream_at_a_time(name, options):
    policy = build(name, options)
    data = batch()
    together = policy.compress(data, BUDGET)
    for stream in range(data.num_streams):
        alone_batch = sub_batch(data, [stream], 1)
        alone = policy.compress(alone_batch, BUDGET)
        width = alone_batch.max_len
        assert_same_selection(selection_rows(together, [stream], width),
                              selection_rows(alone, [0], width), alone_batch.live_mask())


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_deterministic(name, options):
    data = batch()
    first = build(name, options).compress(data, BUDGET)
    second = build(name, options).compress(data, BUDGET)
    streams = range(data.num_streams)
    assert_same_selection(selection_rows(first, streams, data.max_len),
                          selection_rows(second, streams, data.max_len), data.live_mask())


@pytest.mark.parametrize(("name", "options"), cases_where(merges))
def test_merging_policies_really_merge(name, options):
    """Merges are real: some centre's key or value differs from every original slot."""
    policy = build(name, options)
    data = batch()
    selection = policy.compress(data, BUDGET)
    out = apply_selection(data, selection)
    kept = selection.keep & data.live_mask()
    changed = (out.values[out.live_mask()] != data.values[kept]).any(dim=-1)
    assert changed.any()


def test_half_precision_cache():
    """Policies accept half-precision caches; apply_selection keeps the dtype."""
    data = batch()
    data.keys, data.values = data.keys.bfloat16(), data.values.bfloat16()
    for name in ("ems", "mikv", "cam", "d2o"):
        out = apply_selection(data, make_policy(name, window=WINDOW).compress(data, BUDGET))
        assert out.keys.dtype == torch.bfloat16 and out.values.dtype == torch.bfloat16
        assert torch.isfinite(out.keys[out.live_mask()].float()).all()
