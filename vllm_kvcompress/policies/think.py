"""ThinK: prune the least useful key channels, on top of a token policy.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (2024).
"""

from __future__ import annotations

import math

import torch

from vllm_kvcompress.policies.base import TOKEN_POLICIES, ComposedPolicy
from vllm_kvcompress.policies.options import choice, integer, number
from vllm_kvcompress.policies.selection import NarrowKeyTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.registry import register_policy


@register_policy("think")
class ThinK(ComposedPolicy):
    """The base policy chooses the tokens; ThinK prunes key channels. Per stream and key
    channel c: score_c = mean over the last `recent` window queries (and the G heads) of
    q_c^2, times mean over the kept keys of k_c^2; the floor(pruning_ratio * D) lowest
    are pruned (Selection.key_scales: 0 pruned, 1 kept). At a stream's first compression
    its kept tokens except the last `recent` slots are narrowed (Selection.narrow): stored
    in the narrow-key tier with the kept channels only, the pruned ones read back as 0.
    The channel choice is fixed then, one per stream (the cache ignores later ones), so
    the prompt's keys are pruned once and the keys of later tokens stay whole; the base
    keeps choosing among all of a stream's tokens, narrow or not. Values are untouched.
    Every stream is narrowed at the request's first compression, those within their
    budget too (they keep all their tokens), so that the tokens a stream holds whole are
    never more than `recent` plus those that came since (the scheduler's bound).

    Signals: window queries (>= recent) plus the base's. Defaults: base snapkv,
    pruning_ratio 0.4, recent 32 (paper; the authors' function defaults are 0.3 and 128).
    """

    options_spec = {
        "base": choice("snapkv", *TOKEN_POLICIES),
        "pruning_ratio": number(0.4, 0.0, 1.0, high_open=True),
        "recent": integer(32, 1),
    }

    def __init__(self, window=None, sinks=None, **options):
        super().__init__(window, sinks, **options)
        self.needs_window_queries = True
        self.second_tier = NarrowKeyTier(self.options["pruning_ratio"])

    @property
    def query_window(self) -> int:
        return max(self.base.query_window, self.options["recent"])

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        selection = self.base.select(batch, budgets, scores=scores, window=window, sinks=sinks)
        return self._prune(batch, selection)

    def _prune(self, batch: StreamBatch, selection: Selection) -> Selection:
        queries, query_positions = batch.require_window_queries(self.name)
        recent = self.options["recent"]
        queries, query_positions = queries[:, :, -recent:], query_positions[:, -recent:]
        present = (query_positions >= 0)[:, None, :, None]                          # [N, 1, W, 1]
        query_energy = torch.where(present, queries.float() ** 2, 0.0).sum(dim=(1, 2)) \
            / (present.sum(dim=(1, 2)) * queries.shape[1]).clamp(min=1)             # [N, D]
        keep = selection.keep
        key_energy = torch.where(keep[..., None], batch.keys.float() ** 2, 0.0).sum(dim=1) \
            / keep.sum(dim=1, keepdim=True).clamp(min=1)
        pruned = math.floor(self.options["pruning_ratio"] * batch.keys.shape[-1])
        order = (query_energy * key_energy).argsort(dim=1, stable=True)
        selection.key_scales = torch.ones_like(key_energy).scatter(1, order[:, :pruned], 0.0)
        old = slot_indices(batch) < (batch.lengths - recent)[:, None]
        selection.narrow = keep & old
        selection.second_tier = self.second_tier
        return selection
