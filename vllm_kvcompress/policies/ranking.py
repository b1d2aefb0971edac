"""Selection helpers: protected slots, ranks within a stream, top-k under a budget."""

from __future__ import annotations

from typing import Any

import torch

from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices


def _column(value: Any) -> Any:
    """An int as is, an [N] tensor as [N, 1] (to broadcast against [N, T])."""
    return value[:, None] if isinstance(value, torch.Tensor) else value


def protected_mask(batch: StreamBatch, window: Any, sinks: Any) -> torch.Tensor:
    """[N, T] bool: the first `sinks` and the last `window` live slots of each stream.

    window, sinks: ints, or [N] int64 per stream.
    """
    slots = slot_indices(batch)
    lengths = batch.lengths[:, None]
    live = slots < lengths
    return live & ((slots < _column(sinks)) | (slots >= lengths - _column(window)))


def descending_ranks(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[..., T] int64 rank of each slot along the last dim when ordered by class
    (descending), then score (descending, NaN last), then slot index (ascending).

    The order among slots of one class never depends on slots of other classes, so
    padding (class 0) cannot change the ranks of live slots.
    """
    key = torch.nan_to_num(scores.float(), nan=-torch.inf)
    order = key.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, classes.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def select_ranked(scores: torch.Tensor, classes: torch.Tensor, budgets: Any) -> torch.Tensor:
    """[N, T] bool: the first `budgets` slots of each stream in `descending_ranks` order,
    never a slot of class 0. budgets: int or [N]."""
    return (descending_ranks(scores, classes) < _column(budgets)) & (classes > 0)


def top_k_with_protection(scores: torch.Tensor, batch: StreamBatch, budgets: Any,
                          window: Any, sinks: Any) -> torch.Tensor:
    """[N, T] bool keep-mask: protected slots first, then the highest `scores`.

    Streams whose length is within budget keep everything. If the protected slots alone
    exceed a budget, the most recent protected slots win (the window is kept before sinks).
    Ties between equal scores go to the earlier slot.
    """
    live = batch.live_mask()
    protected = protected_mask(batch, window, sinks)
    slots = slot_indices(batch).expand_as(live)
    # Protected slots rank by recency, the others by score; then by class.
    key = torch.where(protected, slots.float(), scores.float())
    classes = 2 * protected.long() + live.long()
    return select_ranked(key, classes, budgets)
