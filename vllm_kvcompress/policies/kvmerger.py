"""KVMerger: runs of similar adjacent keys merge into their most attended member.

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks" (2024).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.options import layer_list, number
from vllm_kvcompress.policies.ranking import protected_mask, select_ranked, top_k_with_protection
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.merge_span import merge_span_option, within_merge_span
from vllm_kvcompress.policies.registry import register_policy


@register_policy("kvmerger")
class KVMerger(Policy):
    """Merging sets: maximal runs of adjacent unprotected slots whose consecutive keys have
    cosine >= merge_threshold. Each set's pivot is its member with the highest accumulated
    attention; members merge into the pivot with Gaussian-kernel weights
    w_i = exp(-||k_p - k_i||^2 / (2 sigma^2)) (pivot: 1), keys and values alike.

    Meeting a hard budget (ours: the paper sets the rate through the threshold): sinks and
    window first, then set pivots ranked by the set's total accumulated attention, then
    the remaining members by their own (a kept member stands for itself); a set whose
    pivot is not kept is evicted whole. `unmerged_layers` (paper: the first two and the
    last) only evict, by accumulated attention.

    Signals: acc_scores. Defaults: merge_threshold 0.8 and sigma null (= per set, the
    mean squared distance of its merged members to the pivot) are ours; W=32, no sinks.
    """

    needs_accumulated = True
    default_window = 32
    default_sinks = 0
    allocators = ("uniform", "pyramid", "adakv", "pyramid_adakv")
    options_spec = {
        "merge_threshold": number(0.8, -1.0, 1.0),
        "sigma": number(None, 0.0, low_open=True, optional=True),
        "unmerged_layers": layer_list((0, 1, -1)),
        "max_merge_span": merge_span_option(),
    }

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return batch.acc_scores.float()

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        unmerged = {i % batch.num_layers for i in self.options["unmerged_layers"]
                    if -batch.num_layers <= i < batch.num_layers}
        if batch.layer in unmerged:
            return Selection(keep=top_k_with_protection(scores, batch, budgets, window, sinks))

        live = batch.live_mask()
        protected = protected_mask(batch, window, sinks)
        slots = slot_indices(batch).expand_as(live)
        num_slots = batch.max_len
        attention = torch.where(live, scores.float(), -torch.inf)

        # Runs: slot t joins slot t + 1's set when both are unprotected and similar.
        candidate = live & ~protected
        unit = F.normalize(batch.keys.float(), dim=-1)
        similar = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1) >= self.options["merge_threshold"]
        linked = similar & candidate[:, :-1] & candidate[:, 1:]                    # [N, T-1]
        starts = torch.cat([torch.ones_like(linked[:, :1]), ~linked], dim=1)
        run = starts.long().cumsum(dim=1) - 1                                      # [N, T]

        # Pivot: the earliest member with the run's highest attention.
        best = torch.full_like(attention, -torch.inf).scatter_reduce(1, run, attention, "amax")
        is_best = live & (attention == best.gather(1, run))
        first = torch.full_like(slots, num_slots).scatter_reduce(
            1, run, torch.where(is_best, slots, num_slots), "amin")
        pivot = first.gather(1, run).clamp(max=num_slots - 1)
        is_pivot = live & (pivot == slots)
        mass = torch.zeros_like(attention).scatter_add(1, run, torch.where(live, scores.float(), 0.0))

        rank_score = torch.where(protected, slots.float(),
                                 torch.where(is_pivot, mass.gather(1, run), scores.float()))
        classes = torch.where(protected, 3, torch.where(is_pivot, 2, live.long()))
        keep = select_ranked(rank_score, classes, budgets)

        merge = (live & ~keep & keep.gather(1, pivot)
                 & within_merge_span(batch.positions, pivot, self.options["max_merge_span"]))
        merge_into = torch.where(keep, slots, torch.where(merge, pivot, -1))
        return Selection(keep=keep, merge_into=merge_into,
                         weights=self._weights(batch, run, pivot, merge))

    def _weights(self, batch: StreamBatch, run: torch.Tensor, pivot: torch.Tensor,
                 merge: torch.Tensor) -> torch.Tensor:
        """[N, T] Gaussian-kernel weights of merged members (1 elsewhere)."""
        keys = batch.keys.float()
        pivot_keys = keys.gather(1, pivot[..., None].expand_as(keys))
        distance = torch.where(merge, ((keys - pivot_keys) ** 2).sum(dim=-1), 0.0)
        if self.options["sigma"] is None:
            total = torch.zeros_like(distance).scatter_add(1, run, distance)
            count = torch.zeros_like(distance).scatter_add(1, run, merge.float())
            variance = (total / count.clamp(min=1)).gather(1, run)
        else:
            variance = torch.full_like(distance, float(self.options["sigma"]) ** 2)
        kernel = torch.exp(-distance / (2 * torch.where(variance > 0, variance, 1.0)))
        return torch.where(merge, kernel, 1.0)
