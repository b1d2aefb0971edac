"""Attention-Gate: keep the tokens a trained in-context gate flags as needed.

Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate" (2024). The gates
(scorers/attention_gate.py) are trained with `vllm-kvcompress train gate` on the frozen
model (distilled from the attention later queries pay) and shipped in policies/weights/.
"""

from __future__ import annotations

from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.trained_scorer import TrainedScorerPolicy


@register_policy("attention_gate")
class AttentionGate(TrainedScorerPolicy):
    """Score = the gate's keep logit for each slot, from the token and the tokens of its
    request written before it in the same step. The paper thresholds the logit into a
    flag; we rank by it so the budget means what it means for every policy.

    Defaults: 4 sinks, window 32 (as locret); weights: gate-smollm2-135m.safetensors.
    """

    scorer_kind = "gate"
    default_window = 32
    default_sinks = 4
