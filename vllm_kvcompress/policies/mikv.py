"""MiKV: tokens a policy would evict are kept at low precision instead.

Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware
Mixed Precision Quantization" (2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import (TOKEN_POLICIES, ComposedPolicy, Selection, StreamBatch,
                                           budget_share, choice, flag, integer, number,
                                           protected_mask, select_ranked, slot_indices)
from vllm_kvcompress.policies.registry import register_policy


@register_policy("mikv")
class MiKV(ComposedPolicy):
    """Of a stream's budget C, the base policy keeps C - floor(low_precision_ratio * C)
    slots at full precision (run as if that were its budget, so its window and sinks come
    from that share; protected slots always stay at full precision). The best-scored
    tokens it evicts (by the base's score; tokens it merges elsewhere are already
    represented) fill the remaining slots at `bits` bits (per-token asymmetric
    round-to-nearest, Selection.low_precision). Outlier balancing: b_c =
    sqrt(max|q_c| / max|k_c|) per stream and key channel (window queries over the group,
    live keys); keys are quantized as k_c * b_c (Selection.key_channel_scale).

    The budget counts slots (kept count <= C holds, as the scheduler needs). A paged cache
    with full-size slots saves no memory on low-precision slots: that needs a packed store,
    for which Selection.low_precision already marks the slots. Streams within budget are
    untouched.

    Signals: the base's, plus window queries for balancing. Defaults: base h2o, bits 3 and
    low_precision_ratio 0.5 (the paper's line-retrieval setting: 50% of the tokens
    evicted, kept at 3 bits), outlier_balancing true; balancing reads 32 window queries
    when the base needs none (ours).
    """

    options_spec = {
        "base": choice("h2o", *TOKEN_POLICIES),
        "bits": integer(3, 2, 8),
        "low_precision_ratio": number(0.5, 0.0, 1.0, high_open=True),
        "outlier_balancing": flag(True),
    }

    def __init__(self, window=None, sinks=None, **options):
        super().__init__(window, sinks, **options)
        balancing = self.options["outlier_balancing"]
        self.needs_window_queries = self.base.needs_window_queries or balancing

    @property
    def query_window(self) -> int:
        if self.base.needs_window_queries:
            return self.base.query_window
        return 32 if self.options["outlier_balancing"] else 0

    def protection(self, budget):
        # The base runs as if its budget were the full-precision share.
        return self.base.protection(budget - budget_share(budget, self.options["low_precision_ratio"]))

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.base.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        # Protected slots always stay at full precision.
        protected = protected_mask(batch, window, sinks).sum(dim=1)
        share = budget_share(budgets, self.options["low_precision_ratio"])
        low = torch.minimum(share, budgets - protected)
        low = torch.where(batch.lengths > budgets, low.clamp(min=0), 0)
        selection = self.base.select(batch, budgets - low, scores=scores, window=window, sinks=sinks)
        # Candidates: live slots the base neither keeps nor merges elsewhere.
        spare = batch.live_mask() & ~selection.keep
        if selection.merge_into is not None:
            spare &= selection.merge_into < 0
        if selection.value_merge_into is not None:
            spare &= (selection.value_merge_into < 0).all(dim=2)
        low_precision = select_ranked(scores, spare.long(), low)
        selection.keep = selection.keep | low_precision
        if selection.merge_into is not None:
            slots = slot_indices(batch).expand_as(low_precision)
            selection.merge_into = torch.where(low_precision, slots, selection.merge_into)
        selection.low_precision = low_precision
        selection.quant_bits = self.options["bits"]
        if self.options["outlier_balancing"]:
            selection.key_channel_scale = self._balance(batch)
        return selection

    def _balance(self, batch: StreamBatch) -> torch.Tensor:
        """[N, D] b_c = sqrt(max|q_c| / max|k_c|), 1 where either maximum is 0."""
        queries, query_positions = batch.require_window_queries(self.name)
        present = (query_positions >= 0)[:, None, :, None]
        query_max = torch.where(present, queries.float().abs(), 0.0).amax(dim=(1, 2))
        key_max = torch.where(batch.live_mask()[..., None], batch.keys.float().abs(), 0.0).amax(dim=1)
        usable = (query_max > 0) & (key_max > 0)
        ratio = query_max / torch.where(usable, key_max, 1.0)
        return torch.where(usable, ratio.sqrt(), 1.0)
