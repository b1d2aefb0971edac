"""BatchLLM's scheduling, engine-free: admission by peak pages and group membership.

Admission: vLLM admits a waiting request when its prompt's pages are free now, so a batch
of long outputs fills memory with prompts and then preempts as their decodes grow. Here a
request is admitted only when every admitted request can reach its peak (prompt + output
pages, or its compressed bound) in the pages free now: nothing is preempted and the
memory left idle is what the next request in order would not fit in. A page the request
shares with a running request, a held group prefix or a request admitted just before it
costs nothing; a cached page nobody holds costs one (taking it empties a free slot).

Groups: requests that share a prefix (the plan's groups, or a client's `kv_group`) keep
each common page in memory from the first member until the last member that reads it
ends, so a member admitted after the others finished still finds its whole prefix. A
client sending members one at a time says how many there are (`kv_group_size`); the
pages common to the members so far are then kept until the last one has arrived.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# vllm_xargs key naming a request's group: a string or an integer (a JSON scalar).
GROUP_KEY = "kv_group"
# vllm_xargs key: how many requests the group has in all, for clients that send its members
# one after another (the engine keeps the shared pages for the members still to come).
GROUP_SIZE_KEY = "kv_group_size"
MAX_GROUP_SIZE = 1 << 20


def valid_group(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 256) or \
        (isinstance(value, int) and not isinstance(value, bool))


def valid_group_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GROUP_SIZE


@dataclass
class Candidate:
    """A waiting request as admission sees it: its prompt's full pages (hashes, in order)
    and the pages it still needs at its peak beyond those."""

    pages: Sequence[Hashable]
    private_pages: int


def admissible(candidates: Iterable[Candidate], free_pages: int, reserved: int,
               in_use: Callable[[Hashable], bool], limit: int) -> int:
    """How many of `candidates` (in queue order, at most `limit`) to admit: the longest
    head of the queue whose pages fit in `free_pages` after `reserved` (what running
    requests still grow by). in_use(page): the page is held by someone already."""
    claimed: set[Hashable] = set()
    left = free_pages - reserved
    count = 0
    for candidate in candidates:
        if count == limit:
            break
        new = [page for page in candidate.pages if page not in claimed and not in_use(page)]
        need = len(new) + candidate.private_pages
        if need > left:
            break
        claimed.update(new)
        left -= need
        count += 1
    return count


class GroupMembers:
    """Unfinished requests per group, and how many of them read each page. A group may say
    how many members it has (`kv_group_size`): until that many arrived, the pages common to
    every member so far count as read by the members still to come."""

    def __init__(self) -> None:
        self.chains: dict[str, Sequence[Hashable]] = {}       # request id -> its pages
        self.group_of: dict[str, Hashable] = {}
        self.readers: dict[Hashable, Counter] = {}             # group -> page -> members
        self.sizes: dict[Hashable, int] = {}                   # group -> members announced
        self.arrived: Counter = Counter()                      # group -> members received
        self.common: dict[Hashable, list[Hashable]] = {}       # group -> pages all arrived read

    def add(self, group: Hashable, request_id: str, pages: Sequence[Hashable],
            size: int | None = None) -> list[Hashable]:
        """Count a request in its group (size: the group's members, this one included, if
        the client said). Returns the pages kept for members to come that no member reads
        or awaits any more (the common part shrank, or the last one arrived)."""
        kept_before = self._awaited(group)
        self.chains[request_id] = list(pages)
        self.group_of[request_id] = group
        self.readers.setdefault(group, Counter()).update(set(pages))
        if size is not None:
            self.sizes[group] = max(size, self.sizes.get(group, 0))
        self.arrived[group] += 1
        common = self.common.get(group)
        self.common[group] = list(pages) if common is None else common_prefix(common, pages)
        readers = self.readers[group]
        return [page for page in kept_before - self._awaited(group) if not readers[page]]

    def remove(self, request_id: str) -> list[Hashable]:
        """Forget a request that ended; returns the pages no member of its group reads
        or awaits any more (those to let go)."""
        group = self.group_of.pop(request_id, None)
        if group is None:
            return []
        readers, awaited = self.readers[group], self._awaited(group)
        done = []
        for page in set(self.chains.pop(request_id)):
            readers[page] -= 1
            if not readers[page]:
                del readers[page]
                if page not in awaited:
                    done.append(page)
        if not readers and not awaited:
            for table in (self.readers, self.sizes, self.arrived, self.common):
                table.pop(group, None)
        return done

    def pages_still_needed(self, request_id: str) -> list[Hashable]:
        """The request's leading pages that another unfinished member of its group also
        reads, or that members still to come are awaited to read."""
        group = self.group_of.get(request_id)
        if group is None:
            return []
        readers, awaited = self.readers[group], self._awaited(group)
        needed = []
        for page in self.chains[request_id]:
            if readers[page] < 2 and page not in awaited:
                break
            needed.append(page)
        return needed

    def _awaited(self, group: Hashable) -> set[Hashable]:
        """Pages kept for the group's members still to come."""
        if self.sizes.get(group, 0) <= self.arrived[group]:
            return set()
        return set(self.common.get(group, ()))

    @property
    def groups(self) -> list[Hashable]:
        return list(self.readers)


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> list[Hashable]:
    """The leading items `a` and `b` have in common."""
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return common
