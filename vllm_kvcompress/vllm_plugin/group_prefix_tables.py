"""Worker side of a group's compressed prefix (sharing/group_prefix.py): the stream tables
of each group's leader, kept when it ends, and given to members the scheduler started on
its pages.

The scheduler holds the pages; the worker keeps what only it knows, where each stream's
head-blocks are in them. Both apply the same rule when a leader ends (prompt in, a whole
prompt of full pages, every stream the same number of full pages), so a member marked by
the scheduler always finds its group's tables here. Tables whose pages the scheduler has
let go are dropped when one of those pages is handed out fresh to another request.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch

from vllm_kvcompress.cache.paged_stream_cache import PagedStreamCache
from vllm_kvcompress.sharing.group_prefix import kept_tokens


@dataclass
class LeaderTables:
    """block_tables [L, H, P] int32: each stream's head-blocks; tokens: each stream's length."""

    block_tables: torch.Tensor
    tokens: int
    pages: frozenset[int]


class GroupPrefixTables:
    def __init__(self, cache: PagedStreamCache, prefix_caching: bool):
        self.cache = cache
        self.prefix_caching = prefix_caching
        self.groups: dict[Hashable, LeaderTables] = {}
        self._group_of_page: dict[int, Hashable] = {}

    def keep(self, group: Hashable, slot: int, prompt_len: int, num_tokens: int,
             budget: int | None, compressed: bool) -> None:
        """A leader in `slot` ended: keep its tables for `group` if the scheduler keeps its
        pages (the rule of KVCompressScheduler._keep_group_prefix)."""
        cache = self.cache
        tokens = kept_tokens(prompt_len, budget, compressed, cache.block_size)
        if tokens is None or num_tokens < prompt_len or not self.prefix_caching:
            return
        lengths = cache.tables.lengths[:, slot]
        if not bool((lengths == tokens).all()):
            raise RuntimeError(f"group {group!r}: the leader's streams hold {int(lengths.min())} "
                               f"to {int(lengths.max())} tokens, not {tokens} each: its policy "
                               f"does not keep the same number of tokens in every head")
        tables = cache.tables.block_tables[:, slot, :, :tokens // cache.block_size].clone()
        self._drop(group)
        pages = set((tables.long() // cache.num_kv_heads).unique().tolist())
        self.groups[group] = LeaderTables(tables, tokens, frozenset(pages))
        self._group_of_page.update(dict.fromkeys(pages, group))

    def attach(self, group: Hashable, slot: int) -> None:
        """Start an empty request's streams on its group's prefix (its page list begins
        with the prefix's pages)."""
        leader = self.groups.get(group)
        if leader is None:
            raise RuntimeError(f"group {group!r}: the scheduler started a member on a prefix "
                               f"this worker did not keep")
        self.cache.share_streams(slot, leader.block_tables, leader.tokens)

    def pages_reused(self, pages: Iterable[int]) -> None:
        """Freshly allocated pages: a group whose prefix used one of them has ended."""
        for page in pages:
            group = self._group_of_page.get(page)
            if group is not None:
                self._drop(group)

    def _drop(self, group: Hashable) -> None:
        leader = self.groups.pop(group, None)
        if leader is not None:
            for page in leader.pages:
                if self._group_of_page.get(page) == group:
                    del self._group_of_page[page]
