"""Batch admission by peak pages and group membership, engine-free."""

from __future__ import annotations

from vllm_kvcompress.sharing.batch_scheduling import (
    Candidate,
    GroupMembers,
    admissible,
    valid_group,
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


def test_group_values():
    assert valid_group("doc-7") and valid_group(7)
    assert not valid_group("") and not valid_group(True) and not valid_group([1])
    assert not valid_group("x" * 257) and not valid_group(1.5)
