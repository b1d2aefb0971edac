"""A group's shared prefix stored compressed once and read by every member (beyond
BatchLLM, which shares a prefix only at full size).

A leader request (`kv_group_prefix: true`) carries the group's common prefix as its whole
prompt, compressed by its own policy (snapkv: scores from the prefix's last queries, so
the same for every question that follows). When it ends, its compressed pages stay
in memory for the group, and a member whose prompt starts with the prefix starts its
streams on them: it computes only its own tokens and holds pages only for them. Members
run uncompressed, so the prefix pages are never written again.

The pages stay shareable only when every stream of the leader has the same length and
that length fills whole pages (head-block p of every head in page p of the streams'
pages): a budget that is a multiple of the page size, or an uncompressed prompt of whole
pages.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_kvcompress.sharing.batch_scheduling import GROUP_KEY, GROUP_SIZE_KEY, common_prefix

# vllm_xargs key marking a group's leader: its prompt is the prefix to share compressed.
GROUP_PREFIX_KEY = "kv_group_prefix"
# Set by the scheduler on a member it starts on the group's prefix (read by the worker).
READS_GROUP_PREFIX = "_kv_reads_group_prefix"
# Policies a leader may compress with: every head keeps exactly its budget, full-size rows.
PREFIX_POLICIES = ("snapkv", "streaming")


@dataclass
class GroupPrefix:
    """A leader's kept pages. pages: the scheduler's blocks, in stream order; prefix_len:
    the prompt tokens they stand for; tokens: what each stream holds (<= prefix_len);
    page_hashes: the prefix's full-page hashes, which a member's prompt must start with."""

    pages: list[Any]
    prefix_len: int
    tokens: int
    page_hashes: Sequence[Hashable]

    @property
    def saved_tokens(self) -> int:
        """Prompt tokens a member does not hold pages for."""
        return self.prefix_len - self.tokens

    def covers(self, page_hashes: Sequence[Hashable], num_tokens: int) -> bool:
        """A prompt with these full-page hashes and length starts with the prefix and
        has a token of its own after it."""
        count = len(self.page_hashes)
        return num_tokens > self.prefix_len and list(page_hashes[:count]) == list(self.page_hashes)


def is_leader(extra_args: dict | None) -> bool:
    return bool((extra_args or {}).get(GROUP_PREFIX_KEY))


def kept_tokens(prompt_len: int, budget: int | None, compressed: bool,
                block_size: int) -> int | None:
    """Tokens each stream of a leader holds when it ends, or None if its pages cannot be
    shared (streams that do not fill whole pages)."""
    tokens = budget if compressed else prompt_len
    if prompt_len % block_size or tokens is None or tokens % block_size or tokens > prompt_len:
        return None
    return tokens


@dataclass
class PrefixGroup:
    """Requests (batch indices) whose prompts all start with the same `prefix_len` tokens
    (whole pages): the most each of them shares with another request."""

    prefix_len: int
    members: list[int]


def prefix_groups(prompts: Sequence[Sequence[int]], page_tokens: int,
                  min_pages: int = 2) -> list[PrefixGroup]:
    """Group requests by the longest run of full pages each shares with another request
    (at least `min_pages`): in a system prompt -> document -> question batch, the
    questions on one document. Requests sharing less stay out."""
    ranked = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    shared = [0] * len(prompts)
    for a, b in zip(ranked, ranked[1:]):
        pages = _common_full_pages(prompts[a], prompts[b], page_tokens)
        shared[a], shared[b] = max(shared[a], pages), max(shared[b], pages)
    groups: dict[tuple[int, ...], PrefixGroup] = {}
    for index in ranked:
        if shared[index] < min_pages:
            continue
        length = shared[index] * page_tokens
        key = tuple(prompts[index][:length])
        groups.setdefault(key, PrefixGroup(length, [])).members.append(index)
    return [group for group in groups.values() if len(group.members) > 1]


def _common_full_pages(a: Sequence[int], b: Sequence[int], page_tokens: int) -> int:
    # A page is shareable only if a token of each prompt follows it (the member computes it).
    common = min(len(common_prefix(a, b)), len(a) - 1, len(b) - 1)
    return common // page_tokens


@dataclass
class Submission:
    """One request of a batch with group prefixes: index into the batch (None: a leader),
    its prompt tokens and what it adds to extra_args."""

    index: int | None
    prompt: list[int]
    extra: dict[str, Any]


def with_leaders(prompts: Sequence[Sequence[int]], order: Sequence[int], page_tokens: int,
                 rate: int) -> list[Submission]:
    """The batch in `order` with a leader just before the first member of each prefix
    group: it keeps the group's prefix at 1 / rate of its tokens (whole pages, at least
    one), and the members, uncompressed, read it."""
    if rate < 1:
        raise ValueError(f"group_prefix_rate must be at least 1; got {rate}")
    group_of = {}
    for number, group in enumerate(prefix_groups(prompts, page_tokens)):
        group_of.update(dict.fromkeys(group.members, (f"prefix-{number}", group)))
    submissions, led = [], set()
    for index in order:
        if index not in group_of:
            submissions.append(Submission(index, list(prompts[index]), {}))
            continue
        name, group = group_of[index]
        if name not in led:
            led.add(name)
            budget = max(group.prefix_len // rate // page_tokens, 1) * page_tokens
            submissions.append(Submission(None, list(prompts[index][:group.prefix_len]), {
                GROUP_KEY: name, GROUP_PREFIX_KEY: True, "budget": budget,
                GROUP_SIZE_KEY: len(group.members) + 1}))
        submissions.append(Submission(index, list(prompts[index]),
                                      {GROUP_KEY: name, "kv_policy": "none"}))
    return submissions
