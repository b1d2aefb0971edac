"""EMS: Global-Local scores, head-wise evict-then-merge with a zero class.

Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression
Based on Global-Local Importance" (2024). Only the abstract was available: the score,
the merge rule and the defaults below are OUR working definition (docs/policies.md).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.merge_span import merge_span_option, within_merge_span
from vllm_kvcompress.policies.options import choice, integer, number
from vllm_kvcompress.policies.ranking import top_k_with_protection
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.scoring import global_local_score, most_similar_kept
from vllm_kvcompress.policies.snapkv import pooled_window_scores


@register_policy("ems")
class EMS(Policy):
    """The budget is KV memory: that of `budget` full 16-bit tokens per stream, of which
    1 - lowbit_share is kept at full precision (full_budget) and the rest holds low-bit
    rows for the zero class (second_tier_for).

    Score s_GL = max(w * s_glo * mean(s_loc) / mean(s_glo), s_loc) per head (s_glo:
    accumulated attention, s_loc: attention of the last W queries, max-pooled over 7
    slots as SnapKV does). Per head, the top slots within the head's full-precision budget
    (sinks and window first) are kept as class centres; an evicted slot whose key has
    cosine >= merge_threshold with its most similar centre, at most max_merge_span
    positions away, merges into it (weights = s_GL, centre included); the others fall in
    the zero class, which is demoted to the low-bit tier (ranked by s_GL, lowest dropped
    past its rows) instead of being evicted; with lowbit_share 0 it is evicted (a merge
    of weight 0). Budgets are head-wise adaptive (Ada-KV allocator), so sparse heads
    mostly evict while redundant heads merge.

    Signals: window queries; acc_scores only when global_weight > 0. Defaults (ours): W=32,
    4 sinks, merge_threshold 0.9, allocator adakv (alpha 0.2), gqa_reduce mean, pool max
    kernel 7, global_weight 0: on the bundled model any global share lost retrieval
    (needle_single at 2k, budget 256: 100% at w=0, 40% at w=0.1, 0% at w=1, see
    docs/policies.md); lowbit_share 0.5 with rows of 4 + 2 bits (docs/quality.md: at the
    same bytes, lower perplexity and more passkeys than evicting). Acts at every
    compression (every `interval` tokens).
    """

    needs_window_queries = True
    default_window = 32
    default_sinks = 4
    allocators = ("adakv", "uniform", "pyramid", "pyramid_adakv")
    options_spec = {
        "merge_threshold": number(0.9, -1.0, 1.0),
        "gqa_reduce": choice("mean", "mean", "max"),
        "global_weight": number(0.0, 0.0, 1.0),
        "pool": choice("max", "max", "avg", "none"),
        "pool_kernel": integer(7, 1, odd=True),
        "lowbit_share": number(0.5, 0.0, 1.0, high_open=True),
        "key_bits": integer(4, 1, 8),
        "value_bits": integer(2, 1, 8),
        "max_merge_span": merge_span_option(),
    }

    def __init__(self, window=None, sinks=None, **options):
        super().__init__(window, sinks, **options)
        # Accumulated attention costs score emission in every attention call: only if used.
        self.needs_accumulated = self.options["global_weight"] > 0

    def full_budget(self, budget: int) -> int:
        return max(budget - math.floor(self.options["lowbit_share"] * budget), 1)

    def second_tier_for(self, budget: int, head_size: int) -> LowBitTier | None:
        """The low-bit tier the zero class goes to: as many rows as fill lowbit_share of
        the budget's bytes, counting a full token at 16 bits."""
        if not self.options["lowbit_share"]:
            return None
        tier = LowBitTier(self.options["key_bits"], self.options["value_bits"])
        share_bytes = (budget - self.full_budget(budget)) * 2 * head_size * 2
        return replace(tier, cap=share_bytes // tier.row_bytes(head_size))

    def compress(self, batch: StreamBatch, budget: int) -> Selection:
        selection = super().compress(batch, self.full_budget(budget))
        selection.second_tier = self.second_tier_for(budget, batch.keys.shape[-1])
        return selection

    def score(self, batch: StreamBatch) -> torch.Tensor:
        local = pooled_window_scores(self, batch)
        if not self.needs_accumulated:
            return local
        return global_local_score(batch.acc_scores, local, batch.lengths,
                                  self.options["global_weight"])

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        keep = top_k_with_protection(scores, batch, budgets, window, sinks)
        live = batch.live_mask()
        centre, cosine = most_similar_kept(batch.keys, keep)
        merge = (live & ~keep & (cosine >= self.options["merge_threshold"])
                 & within_merge_span(batch.positions, centre, self.options["max_merge_span"]))
        slots = slot_indices(batch).expand_as(keep)
        merge_into = torch.where(keep, slots, torch.where(merge, centre, -1))
        weights = torch.where(live, scores.float().clamp(min=0), 0.0)
        selection = Selection(keep=keep, merge_into=merge_into, weights=weights)
        if self.options["lowbit_share"]:   # the zero class is demoted, not dropped
            selection.demote = live & ~keep & ~merge
            selection.demote_scores = scores.float()
        return selection
