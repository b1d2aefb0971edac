"""CaM: evicted tokens' values merge into the following tokens' values.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference" (ICML 2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.budgets import budget_share
from vllm_kvcompress.policies.options import integer, number
from vllm_kvcompress.policies.ranking import top_k_with_protection
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.registry import register_policy

_MASK31 = 0x7FFFFFFF


def hashed_uniform(seed: int, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) float64, one per token position [...], a pure function of
    (seed, layer, position): the draws do not depend on how streams are batched."""
    # Multiply-xorshift rounds on 31-bit values: products stay below 2**62 (no overflow).
    x = (positions.long() & _MASK31) * 0x2C1B3C6D + (seed & _MASK31) * 0x297A2D39 + layer * 0x5BD1E995
    for multiplier in (0x27D4EB2F, 0x165667B1, 0x2C1B3C6D):
        x = x & _MASK31
        x = ((x ^ (x >> 15)) * multiplier) & _MASK31
    return (x ^ (x >> 13)).double() / 2 ** 31


@register_policy("cam")
class CaM(Policy):
    """Keep the first and the most recent tokens (StreamingLLM-like, split by
    start_ratio : recent_ratio); a token that is evicted merges its VALUE (its key is
    dropped) into the values of the next `merge_tokens` slots, each getting
    mask_e / merge_tokens * v_e, with mask_e ~ Bernoulli(clamp(A_e / max_kept A, 0, 1))
    and A the accumulated attention (Selection.value_merge_into / value_merge_weights).

    Within our schedule (the paper evicts and merges one token per decode step): all
    tokens leaving the window at one compression are evicted together, and a merge into a
    slot evicted in the same compression is dropped, i.e. the first-order part of the
    paper's cascade (each hop is scaled by mask / merge_tokens). With interval 1 this is
    the paper's rule. Draws: hashed_uniform(seed, layer, position), one per token shared
    by the heads (each head still merges with its own probability), so results are
    deterministic and independent of batching.

    Signals: acc_scores. Defaults: start 10% + recent 10% (paper: C split in half; an
    explicit --kv-sinks / --kv-window overrides the split), merge_tokens 4 and seed 0 (ours).
    """

    needs_accumulated = True
    default_window = None
    default_sinks = None
    options_spec = {
        "start_ratio": number(0.1, 0.0, 1.0),
        "recent_ratio": number(0.1, 0.0, 1.0, low_open=True),
        "merge_tokens": integer(4, 1),
        "seed": integer(0, 0, 2 ** 31 - 1),
    }

    def protection(self, budget):
        start = self.options["start_ratio"]
        sinks = self.sinks if self.sinks is not None else budget_share(
            budget, start / (start + self.options["recent_ratio"]))
        window = self.window if self.window is not None else budget - sinks
        return window, sinks

    def score(self, batch: StreamBatch) -> torch.Tensor:
        # Everything kept is protected; recency only decides if budgets exceed the split.
        return slot_indices(batch).float().expand(batch.num_streams, -1)

    def select(self, batch, budgets, *, scores=None, window=None, sinks=None) -> Selection:
        scores = self.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        keep = top_k_with_protection(scores, batch, budgets, window, sinks)
        live = batch.live_mask()
        evicted = live & ~keep
        attention = batch.acc_scores.float()
        top = torch.where(keep, attention, -torch.inf).amax(dim=1, keepdim=True)
        probability = torch.where(top > 0, attention / torch.where(top > 0, top, 1.0), 0.0).clamp(0, 1)
        draw = hashed_uniform(self.options["seed"], batch.layer, batch.positions)
        merges = evicted & (draw < probability)

        fan = self.options["merge_tokens"]
        slots = slot_indices(batch).expand_as(keep)
        targets = slots[..., None] + torch.arange(1, fan + 1, device=slots.device)     # [N, T, M]
        inside = targets < batch.lengths[:, None, None]
        kept_target = keep.gather(1, targets.clamp(max=batch.max_len - 1).flatten(1)).view_as(targets)
        valid = merges[..., None] & inside & kept_target
        return Selection(keep=keep,
                         value_merge_into=torch.where(valid, targets, -1),
                         value_merge_weights=valid.float() / fan)
