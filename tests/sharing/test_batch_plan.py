"""The batch planner on hand-made batches: tree, groups, order, exact bits."""

from __future__ import annotations

import random

import pytest

from vllm_kvcompress.sharing.batch_plan import plan_batch

PAGE = 4


def segment(value: int, pages: int = 1) -> list[int]:
    return [value] * (PAGE * pages)


def tree_batch(seed: int = 0):
    """2 system prompts x 2 documents x 3 questions, shuffled; returns (prompts, labels)."""
    items = [(s, d, q) for s in range(2) for d in range(2) for q in range(3)]
    random.Random(seed).shuffle(items)
    prompts = [segment(100 + s, 2) + segment(200 + 10 * s + d, 3) + segment(300 + q) + [9]
               for s, d, q in items]
    return prompts, items


def runs(labels: list) -> int:
    """How many contiguous runs the labels form (1 per distinct label if grouped)."""
    return 1 + sum(a != b for a, b in zip(labels, labels[1:]))


def test_shared_prefixes_at_every_depth_run_together():
    prompts, items = tree_batch()
    plan = plan_batch(prompts, [8] * len(prompts), page_tokens=PAGE)
    ordered = [items[i] for i in plan.order]
    assert sorted(plan.order) == list(range(len(prompts)))
    assert runs([s for s, _, _ in ordered]) == 2               # system prompts
    assert runs([(s, d) for s, d, _ in ordered]) == 4          # documents
    assert plan.num_groups == 2
    assert len({plan.groups[i] for i, (s, _, _) in enumerate(items) if s == 0}) == 1
    # The tree holds each system page, document page and question page once.
    pages = 2 * 2 + 4 * 3 + 4 * 3 * 1
    assert plan.unique_prompt_tokens == pages * PAGE + len(prompts)    # + each partial page


def test_decode_heavy_siblings_go_first():
    prompts = [segment(1) + segment(10 + i) for i in range(3)] + [segment(2) + segment(20)]
    max_tokens = [4, 64, 16, 1000]
    plan = plan_batch(prompts, max_tokens, page_tokens=PAGE)
    assert plan.order == [3, 1, 2, 0]


def test_no_sharing_orders_by_decode_share_alone():
    prompts = [segment(i, 2) for i in range(4)]
    plan = plan_batch(prompts, [1, 8, 2, 4], page_tokens=PAGE)
    assert plan.order == [1, 3, 2, 0] and plan.num_groups == 4


def test_identical_prompts_are_one_group_side_by_side():
    prompts = [segment(5, 2), segment(6, 2), segment(5, 2), segment(6, 2)]
    plan = plan_batch(prompts, [8] * 4, page_tokens=PAGE)
    ordered = [prompts[i][0] for i in plan.order]
    assert runs(ordered) == 2 and plan.num_groups == 2
    assert plan.groups[0] == plan.groups[2] != plan.groups[1] == plan.groups[3]


def test_exact_bits_keep_what_a_later_request_reads():
    prompts, items = tree_batch(seed=1)
    plan = plan_batch(prompts, [8] * len(prompts), page_tokens=PAGE, cache_pages=64)
    last = plan.order[-1]
    assert plan.hints[last] == [1] * len(plan.hints[last])     # nothing runs after it
    first = plan.order[0]
    assert plan.hints[first][:5] == [0] * 5                     # its system + document pages
    assert all(len(plan.hints[i]) == len(p) // PAGE for i, p in enumerate(prompts))


def test_bad_batches_are_refused_clearly():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        plan_batch([[1, 2], []], [4, 4])
    with pytest.raises(ValueError, match="2 prompts but 1 max_tokens"):
        plan_batch([[1], [2]], [4])
