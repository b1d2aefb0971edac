"""H2O: heavy hitters by accumulated attention plus a recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.budgets import budget_share
from vllm_kvcompress.policies.options import number
from vllm_kvcompress.policies.stream_batch import StreamBatch
from vllm_kvcompress.policies.registry import register_policy


@register_policy("h2o")
class H2O(Policy):
    """Score = accumulated attention (column sums of A over all queries so far, summed
    over the group); keep the top heavy hitters plus the most recent tokens.

    Signals: acc_scores. Defaults (paper): heavy 10% + recent 10% of the prompt, no sinks.
    With a token budget C the two ratios split C: recent window = floor(C * recent /
    (heavy + recent)) = C/2 by default, unless --kv-window is given. The paper evicts one
    token per decode step once the cache is full; here `interval` tokens are evicted
    together at each compression, each having had up to `interval` more steps to
    accumulate attention (scores keep accumulating between compressions, as in the paper).
    """

    needs_accumulated = True
    default_window = None
    default_sinks = 0
    allocators = ("uniform", "pyramid", "adakv", "pyramid_adakv")
    options_spec = {
        "heavy_ratio": number(0.1, 0.0, 1.0, low_open=True),
        "recent_ratio": number(0.1, 0.0, 1.0),
    }

    def protection(self, budget):
        if self.window is not None:
            return self.window, self.sinks
        share = self.options["recent_ratio"] / (self.options["heavy_ratio"] + self.options["recent_ratio"])
        return budget_share(budget, share), self.sinks

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return batch.acc_scores.float()
