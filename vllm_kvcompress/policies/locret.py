"""Locret: keep the tokens trained retaining heads predict later queries will need.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads" (2024). The heads (scorers/retaining_heads.py) are trained with
`vllm-kvcompress train locret` on the frozen model and shipped in policies/weights/.
"""

from __future__ import annotations

from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.trained_scorer import TrainedScorerPolicy


@register_policy("locret")
class Locret(TrainedScorerPolicy):
    """Score = the retaining heads' prediction for each slot from the token's own q, k, v.

    Defaults: 4 sinks, window 32 (the paper protects the last tokens of each chunk; its
    sizes are for 128k contexts); weights: locret-smollm2-135m.safetensors.
    """

    scorer_kind = "locret"
    default_window = 32
    default_sinks = 4
