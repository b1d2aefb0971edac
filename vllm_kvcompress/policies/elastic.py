"""Elastic Cache: importance-driven eviction, evicted tokens merged into the nearest anchor.

Liu et al., "Efficient Inference of Vision Instruction-Following Models with Elastic
Cache" (ECCV 2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.ranking import top_k_with_protection
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.merge_span import merge_span_option, within_merge_span
from vllm_kvcompress.policies.registry import register_policy


@register_policy("elastic")
class ElasticCache(Policy):
    """Importance = accumulated attention averaged over the request's KV heads (all heads
    of a request keep the same tokens, so their slots stay aligned); keep the sinks, the
    recent window and the most important others; every evicted token merges into the kept
    token nearest by position (ties: the earlier one) with equal weights (scatter mean).

    Within our schedule (the paper also drops, at each decode step, the token 25 positions
    from the end): the last 24 tokens are protected and older ones compete by importance at
    each compression. Signals: acc_scores. Defaults: 4 sinks, window 24; the paper's
    ratio 0.2 is replaced by the budget.
    """

    needs_accumulated = True
    default_window = 24
    default_sinks = 4
    allocators = ("uniform", "pyramid")
    options_spec = {"max_merge_span": merge_span_option()}

    def score(self, batch: StreamBatch) -> torch.Tensor:
        live = batch.live_mask().view(batch.num_requests, batch.num_kv_heads, -1)
        acc = torch.where(live, batch.acc_scores.float().view_as(live), 0.0)
        mean = acc.sum(dim=1) / live.sum(dim=1).clamp(min=1)                             # [R, T]
        return mean.repeat_interleave(batch.num_kv_heads, dim=0)

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        keep = top_k_with_protection(scores, batch, budgets, window, sinks)
        live = batch.live_mask()
        slots = slot_indices(batch).expand_as(keep)
        last = batch.max_len - 1
        before = torch.where(keep, slots, -1).cummax(dim=1).values
        after = torch.where(keep, slots, batch.max_len).flip(1).cummin(dim=1).values.flip(1)
        positions = batch.positions
        gap_before = positions - positions.gather(1, before.clamp(min=0))
        gap_after = positions.gather(1, after.clamp(max=last)) - positions
        use_before = (before >= 0) & ((after > last) | (gap_before <= gap_after))
        anchor = torch.where(use_before, before, torch.where(after <= last, after, -1))
        near = within_merge_span(positions, anchor, self.options["max_merge_span"])
        merge_into = torch.where(keep, slots, torch.where(live & near, anchor, -1))
        return Selection(keep=keep, merge_into=merge_into,
                         weights=torch.ones_like(scores, dtype=torch.float32))
