"""MiKV: the tokens a policy would evict are kept at low precision instead.

Yang et al., "No Token Left Behind: Reliable KV Cache Compression via Importance-Aware
Mixed Precision Quantization" (2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import TOKEN_POLICIES, ComposedPolicy
from vllm_kvcompress.policies.options import choice, flag, integer
from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch


@register_policy("mikv")
class MiKV(ComposedPolicy):
    """The budget is the full-precision tier: the base policy (its own window and sinks)
    keeps the budget's tokens at full precision. Every other live token moves to the
    stream's low-bit tier instead of being evicted (Selection.demote): quantized once, per
    token, keys at `key_bits` and values at `value_bits`, never rewritten; tokens the base
    merges into others are already represented and are not demoted. `lowbit_budget`
    caps that tier per stream: past it, the tokens of lowest rank (the base's score when
    they were demoted) are evicted.

    Outlier balancing: b_c = sqrt(max|q_c| / max|k_c|) per stream and key channel, over
    the window queries of the group and the stream's live keys, as Selection.key_scales:
    the tier stores k_c * b_c and reads it back divided by b_c. The cache fixes each
    stream's factors at its first compression (from the prompt's last queries), so every
    row is read back as stored.

    Signals: the base's, plus 32 window queries for balancing when the base needs none.
    Defaults: base snapkv (the paper uses H2O; on the bundled model h2o keeps no needle,
    docs/policies.md), key_bits 4 and value_bits 2: keys at 2 bits lose retrieval, values
    do not, and at the bytes of 3 + 3 bits, 4 + 2 bits kept every passkey and came closer
    to dense perplexity (docs/quality.md); no cap, outlier balancing on.
    """

    options_spec = {
        "base": choice("snapkv", *TOKEN_POLICIES),
        "key_bits": integer(4, 1, 8),
        "value_bits": integer(2, 1, 8),
        "lowbit_budget": integer(None, 0, optional=True),
        "outlier_balancing": flag(True),
    }

    def __init__(self, window=None, sinks=None, **options):
        super().__init__(window, sinks, **options)
        self.second_tier = LowBitTier(self.options["key_bits"], self.options["value_bits"],
                                   self.options["lowbit_budget"])
        self.needs_window_queries = (self.base.needs_window_queries
                                     or self.options["outlier_balancing"])

    @property
    def query_window(self) -> int:
        if self.base.needs_window_queries:
            return self.base.query_window
        return 32 if self.options["outlier_balancing"] else 0

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.base.score(batch) if scores is None else scores
        selection = self.base.select(batch, budgets, scores=scores, window=window, sinks=sinks)
        # Demote what the base neither keeps nor merges into something it keeps.
        demote = batch.live_mask() & ~selection.keep
        if selection.merge_into is not None:
            demote &= selection.merge_into < 0
        if selection.value_merge_into is not None:
            demote &= (selection.value_merge_into < 0).all(dim=2)
        selection.demote = demote
        selection.demote_scores = scores.float()
        selection.second_tier = self.second_tier
        if self.options["outlier_balancing"]:
            selection.key_scales = self._balance(batch)
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
