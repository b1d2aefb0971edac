"""Batch admission by peak pages and group membership, engine-free."""

from __future__ import annotations

from vllm_kvcompress.sharing.batch_scheduling import (
    Candidate,
    GroupMembers,
    admissible,
    valid_group,
    valid_group_size,
)


def nothing_in_use(page) -> bool:
    return False


def test_admits_the_head_of_the_queue_that_fits_at_its_peak():
    queue = [Candidate(["a", "b"], 3), Candidate(["c"], 4), Candidate(["d"], 1)]
    assert admissible(queue, free_pages=20, reserved=0, in_use=nothing_in_use, limit=9) == 3
    # 5 + 5 = 10 fit, the third would need 12: stop there, in order (no skipping ahead).
    assert admissible(queue, free_pages=11, reserved=0, in_use=nothing_in_use, limit=9) == 2
    # What running requests still grow by is reserved first.
    assert admissible(queue, free_pages=11, reserved=2, in_use=nothing_in_use, limit=9) == 1
    assert admissible(queue, free_pages=20, reserved=0, in_use=nothing_in_use, limit=1) == 1
    assert admissible(queue, free_pages=4, reserved=0, in_use=nothing_in_use, limit=9) == 0


def test_a_shared_page_costs_once():
    system = ["s1", "s2", "s3", "s4"]
    members = [Candidate([*system, f"q{i}"], 2) for i in range(4)]
    # First member: 5 pages + 2; each next one: its own question page + 2.
    assert admissible(members, 7 + 3 * 3, 0, nothing_in_use, 9) == 4
    assert admissible(members, 7 + 3 * 3 - 1, 0, nothing_in_use, 9) == 3
    # Pages already held (by a running member, or a group's hold) cost nothing.
    assert admissible(members, 4 * 3, 0, lambda page: page in system, 9) == 4


def test_group_members_share_what_a_remaining_member_reads():
    groups = GroupMembers()
    groups.add("g", "r1", ["s", "d1", "q1"])
    groups.add("g", "r2", ["s", "d1", "q2"])
    groups.add("g", "r3", ["s", "d2", "q3"])
    groups.add("h", "r4", ["s", "d1", "q1"])          # another group: never counted
    assert groups.pages_still_needed("r1") == ["s", "d1"]
    assert groups.remove("r2") == ["q2"]
    assert groups.pages_still_needed("r1") == ["s"]  # only the system prompt is shared now
    assert sorted(groups.remove("r1")) == ["d1", "q1"]
    assert groups.pages_still_needed("r3") == []
    assert sorted(groups.remove("r3")) == ["d2", "q3", "s"]   # the group's last member
    assert groups.remove("r3") == [] and groups.pages_still_needed("nobody") == []
    assert groups.groups == ["h"]
    assert sorted(groups.remove("r4")) == ["d1", "q1", "s"] and not groups.groups


def test_a_group_of_known_size_keeps_its_common_pages_for_members_still_to_come():
    groups = GroupMembers()
    assert groups.add("g", "r1", ["s", "d", "q1"], size=3) == []
    assert groups.pages_still_needed("r1") == ["s", "d", "q1"]   # the only member so far
    assert groups.remove("r1") == []                              # all kept for r2, r3
    assert groups.groups == ["g"]                                 # awaiting r2 and r3
    # r2 shares s and d: q1 is no longer common to every member, so it goes now.
    assert groups.add("g", "r2", ["s", "d", "q2"]) == ["q1"]
    assert groups.pages_still_needed("r2") == ["s", "d"]
    assert sorted(groups.remove("r2")) == ["q2"]
    # The last member arrives: nothing is awaited any more, and it still reads s and d.
    assert groups.add("g", "r3", ["s", "d", "q3"]) == []
    assert groups.pages_still_needed("r3") == []
    assert sorted(groups.remove("r3")) == ["d", "q3", "s"]
    assert not groups.groups and not groups.sizes and not groups.arrived and not groups.common


def test_a_group_without_a_size_keeps_nothing_past_its_last_member():
    groups = GroupMembers()
    groups.add("g", "r1", ["s", "q1"])
    assert groups.pages_still_needed("r1") == []
    assert sorted(groups.remove("r1")) == ["q1", "s"]
    # A size given later counts the members already received.
    groups.add("h", "r2", ["s", "q2"])
    groups.add("h", "r3", ["s", "q3"], size=2)
    assert groups.pages_still_needed("r2") == ["s"]
    groups.remove("r2")
    assert groups.pages_still_needed("r3") == []


def test_group_values():
    assert valid_group("doc-7") and valid_group(7)
    assert not valid_group("") and not valid_group(True) and not valid_group([1])
    assert not valid_group("x" * 257) and not valid_group(1.5)
    assert valid_group_size(1) and valid_group_size(40)
    assert not valid_group_size(0) and not valid_group_size(True) and not valid_group_size("3")
