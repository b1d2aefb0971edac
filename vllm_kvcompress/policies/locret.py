"""Locret: keep the tokens trained retaining heads predict later queries will need.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads" (2024). The heads (scorers/retaining_heads.py) are trained with
`vllm-kvcompress train locret` on the frozen model and shipped in policies/weights/.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.bundled_models import DEFAULT_MODEL
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.options import file_path
from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.stream_batch import StreamBatch
from vllm_kvcompress.scorers.weights import load_heads, weights_path


@register_policy("locret")
class Locret(Policy):
    """Score = the retaining heads' prediction for each slot, computed from the token's own
    q, k, v when it is written (`write_scorer`), so no attention probabilities are needed
    and attention stays on vLLM's kernel; keep the top slots plus sinks and the window.

    Signals: the written scores (acc_scores). Defaults: 4 sinks, window 32 (the paper
    protects the last tokens of each chunk; its sizes are for 128k contexts); weights:
    the bundled model's (policies/weights/locret-smollm2-135m.safetensors). The weights
    must belong to the served model (checked at start-up and per request).
    """

    default_window = 32
    default_sinks = 4
    options_spec = {"weights": file_path(None)}

    def __init__(self, window: int | None = None, sinks: int | None = None, **options):
        super().__init__(window, sinks, **options)
        self.weights_file = self.options["weights"] or str(weights_path("locret", DEFAULT_MODEL))
        self.write_scorer = load_heads(self.weights_file)

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return batch.acc_scores.float()
