"""Plan an offline batch before anything runs (BatchLLM's global prefix sharing).

A prefix tree over the prompts' full pages (token ids, `page_tokens` per page) finds who
shares what at every depth (system prompt -> document -> question). The plan runs the
batch depth-first through that tree, so a shared prefix is computed once and read by all
its requests while it is still cached; siblings go decode-heavy first (the highest mean
max_tokens / prompt tokens), so their decodes overlap later prefills instead of trailing
at the end. Requests under the same first page form a group. Knowing the whole order, the
plan also gives every request exact replacement bits (Belady's on the batch's own
lookups) for `--kv-cache-replacement predicted`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_kvcompress.sharing.batch_scheduling import GROUP_KEY
from vllm_kvcompress.sharing.predictors import HINT_KEY, exact_hints


@dataclass
class _Node:
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    requests: list[int] = field(default_factory=list)    # requests ending at this node
    decode_ratio: float = 0.0                            # mean over the subtree


@dataclass
class BatchPlan:
    order: list[int]             # indices into the batch, in the order to submit them
    groups: list[int]            # group of each request (by batch index)
    hints: list[list[int]]       # kv_cache_hint bits of each request (by batch index)
    unique_prompt_tokens: int    # tokens the tree holds once: the least any order computes

    @property
    def num_groups(self) -> int:
        return len(set(self.groups))

    def extra_args(self, index: int, hints: bool, groups: bool) -> dict[str, Any]:
        """What a driver sends with request `index` (vllm_xargs): its exact bits as
        kv_cache_hint if `hints`, its group as kv_group if `groups`."""
        extra: dict[str, Any] = {}
        if hints:
            extra[HINT_KEY] = self.hints[index]
        if groups:
            extra[GROUP_KEY] = f"plan-{self.groups[index]}"
        return extra


def plan_batch(prompts: Sequence[Sequence[int]], max_tokens: Sequence[int],
               page_tokens: int = 32, cache_pages: int | None = None) -> BatchPlan:
    """prompts: token ids per request; max_tokens: its output length (the decode share).
    cache_pages: the engine's prefix cache in pages, for the exact bits (default: the
    largest prompt, the least an engine can have)."""
    if len(prompts) != len(max_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_tokens)} max_tokens")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty: every request needs at least one token")
    root = _Node()
    for index, prompt in enumerate(prompts):
        node = root
        for page in _full_pages(prompt, page_tokens):
            node = node.children.setdefault(page, _Node())
        node.requests.append(index)
    ratios = [m / len(p) for m, p in zip(max_tokens, prompts)]
    _subtree_ratio(root, ratios)
    order = _depth_first(root, ratios)
    groups = [0] * len(prompts)
    for group, child in enumerate([root, *root.children.values()]):
        members = root.requests if child is root else _depth_first(child, ratios)
        for index in members:
            groups[index] = group
    ordered_hints = exact_hints([list(prompts[i]) for i in order],
                                cache_pages or 0, page_tokens)
    hints: list[list[int]] = [[] for _ in prompts]
    for index, bits in zip(order, ordered_hints):
        hints[index] = bits
    unique = _tree_pages(root) * page_tokens + sum(len(p) % page_tokens for p in prompts)
    return BatchPlan(order, groups, hints, unique)


def _full_pages(prompt: Sequence[int], page_tokens: int) -> list[tuple[int, ...]]:
    return [tuple(prompt[i:i + page_tokens])
            for i in range(0, len(prompt) - page_tokens + 1, page_tokens)]


def _subtree_ratio(node: _Node, ratios: list[float]) -> tuple[float, int]:
    """(sum, count) of decode ratios under `node`; stores the mean on every node."""
    total, count = sum(ratios[i] for i in node.requests), len(node.requests)
    for child in node.children.values():
        child_total, child_count = _subtree_ratio(child, ratios)
        total, count = total + child_total, count + child_count
    node.decode_ratio = total / count if count else 0.0
    return total, count


def _depth_first(node: _Node, ratios: list[float]) -> list[int]:
    """The subtree's requests: decode-heavy first among siblings, a node's own requests
    (whole prompts that are a prefix of their siblings') before its children's."""
    out = sorted(node.requests, key=lambda i: -ratios[i])
    for child in sorted(node.children.values(), key=lambda c: -c.decode_ratio):
        out += _depth_first(child, ratios)
    return out


def _tree_pages(node: _Node) -> int:
    return sum(1 + _tree_pages(child) for child in node.children.values())
