"""D2O: H2O eviction with density-driven layer budgets and recall-and-merge.

Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference
of Large Language Models" (2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import slot_indices
from vllm_kvcompress.policies.h2o import H2O
from vllm_kvcompress.policies.merge_span import merge_span_option, within_merge_span
from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.scoring import most_similar_kept


@register_policy("d2o")
class D2O(H2O):
    """Token level: H2O (accumulated attention, heavy + recent split, first 4 tokens kept).
    Layer level: budgets from each layer's attention density (budgets.d2o_budgets);
    `full_layers` (paper: 0, 1 and the last) are not compressed. Recall-and-merge: each
    evicted token e finds its most similar kept key r* (cosine c_e); if c_e >= tau it
    merges: k_r* <- (k_r* + sum_e c_e k_e) / (1 + n), same for v (n = tokens merged into
    r*; Selection.normalize_merges=False carries the paper's unnormalised average).

    Within our schedule (the paper acts every decode step): all tokens evicted by one
    compression are handled together, and tau, the paper's EMA over steps of mean(c), is
    the mean of c_e over the stream's evicted tokens of this compression (the stationary
    value of that EMA; policies keep no state between compressions). The paper averages
    c_e over heads; here each head decides for its own evicted tokens (heads evict
    different tokens). Only positive similarities merge.

    Signals: acc_scores, and layer_densities for the d2o allocator. Defaults: heavy 10% +
    recent 10% (C split in half), 4 sinks, full_layers [0, 1, -1]. Memory: a full layer
    holds the whole context, and pages are shared by all layers, so with full layers the
    scheduler cannot save memory (max_layer_budget = NO_LIMIT); set full_layers: [] to
    bound it.
    """

    default_sinks = 4
    allocators = ("d2o", "uniform")
    options_spec = {**H2O.options_spec, "max_merge_span": merge_span_option()}

    def __init__(self, window=None, sinks=None, **options):
        super().__init__(window, sinks, **options)
        self.needs_layer_densities = self.options["allocator"] == "d2o"

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        keep = super().select(batch, budgets, scores=scores, window=window, sinks=sinks).keep
        live = batch.live_mask()
        evicted = live & ~keep
        target, cosine = most_similar_kept(batch.keys, keep)
        similarity = torch.where(evicted, cosine, 0.0)
        tau = similarity.sum(dim=1, keepdim=True) / evicted.sum(dim=1, keepdim=True).clamp(min=1)
        merge = (evicted & (cosine >= tau) & (cosine > 0)
                 & within_merge_span(batch.positions, target, self.options["max_merge_span"]))
        slots = slot_indices(batch).expand_as(keep)
        merge_into = torch.where(keep, slots, torch.where(merge, target, -1))
        merged = torch.zeros_like(similarity).scatter_add(
            1, torch.where(merge, target, 0), merge.float())                        # n per centre
        norm = 1 + merged.gather(1, merge_into.clamp(min=0))
        weights = torch.where(keep, 1.0, torch.where(merge, cosine, 0.0)) / norm
        return Selection(keep=keep, merge_into=merge_into, weights=weights, normalize_merges=False)
