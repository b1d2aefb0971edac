"""Group prefixes, engine-free: which requests share a prefix, where leaders go, what a
leader's streams must hold for its pages to be shared."""

from __future__ import annotations

import pytest

from vllm_kvcompress.sharing.group_prefix import (
    GROUP_PREFIX_KEY,
    GroupPrefix,
    kept_tokens,
    prefix_groups,
    with_leaders,
)

PAGE = 4


def test_prefix_groups_take_the_longest_run_of_pages_shared_with_another_request():
    system, doc1, doc2 = [1] * 8, [2] * 9, [3] * 9
    prompts = [system + doc1 + [5], system + doc2 + [6], system + doc1 + [7, 7],
               system + [4] * 3, [9] * 20, system + doc2 + [8]]
    # doc1's and doc2's questions share 17 tokens: 4 full pages each; prompt 3 shares
    # only the system prompt with the others, who are grouped deeper; prompt 4 nothing.
    found = sorted(sorted(g.members) for g in prefix_groups(prompts, PAGE))
    assert found == [[0, 2], [1, 5]]
    assert all(g.prefix_len == 16 for g in prefix_groups(prompts, PAGE))
    # Identical prompts share all but their last token (a member computes one of its own).
    same = prefix_groups([[1] * 12, [1] * 12], PAGE)
    assert [(g.prefix_len, sorted(g.members)) for g in same] == [(8, [0, 1])]
    assert prefix_groups([[1] * 5, [2] * 5], PAGE) == []
    assert prefix_groups([[1] * 6, [1] * 6 + [2]], PAGE, min_pages=2) == []


def test_with_leaders_puts_one_leader_before_each_groups_first_member():
    system, doc = [1] * 8, [2] * 9
    prompts = [system + doc + [5], [9] * 3, system + doc + [6], system + doc + [7]]
    subs = with_leaders(prompts, [1, 2, 0, 3], PAGE, rate=2)
    assert [s.index for s in subs] == [1, None, 2, 0, 3]
    leader = subs[1]
    assert leader.prompt == (system + doc)[:16] and leader.extra[GROUP_PREFIX_KEY] is True
    assert leader.extra["budget"] == 8 and leader.extra["kv_group_size"] == 4
    assert all(s.extra == {"kv_group": leader.extra["kv_group"], "kv_policy": "none"}
               for s in subs[2:])
    assert subs[0].extra == {}
    with pytest.raises(ValueError, match="group_prefix_rate"):
        with_leaders(prompts, [0], PAGE, rate=0)


def test_kept_tokens_only_when_streams_fill_whole_pages():
    assert kept_tokens(128, 64, compressed=True, block_size=32) == 64
    assert kept_tokens(128, 64, compressed=False, block_size=32) == 128
    assert kept_tokens(128, 48, compressed=True, block_size=32) is None     # partial page
    assert kept_tokens(130, 64, compressed=True, block_size=32) is None     # prompt not whole
    assert kept_tokens(128, None, compressed=False, block_size=32) == 128


def test_a_prefix_covers_prompts_that_start_with_it_and_go_on():
    prefix = GroupPrefix(pages=["p", "q"], prefix_len=8, tokens=4, page_hashes=["a", "b"])
    assert prefix.saved_tokens == 4
    assert prefix.covers(["a", "b", "c"], 9)
    assert not prefix.covers(["a", "b"], 8)          # nothing of its own to compute
    assert not prefix.covers(["a", "x", "c"], 12)
