"""Ada-KV: head-wise adaptive budgets over SnapKV scores.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference" (2024).
"""

from __future__ import annotations

from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.snapkv import SnapKV


@register_policy("adakv")
class AdaKV(SnapKV):
    """SnapKV scores; within each request and layer the H heads share H * (C - W)
    evictable slots: the global top over all heads' scores decides each head's count,
    blended with the even share by the safeguard alpha (budgets.adakv_budgets); every head
    keeps its window. Heads with concentrated attention give budget to diffuse ones.

    Signals: window queries. Defaults: alpha=0.2, W=32, SnapKV's pooling (max, kernel 7).
    allocator: pyramid_adakv composes it with PyramidKV's layer budgets.
    """

    allocators = ("adakv", "pyramid_adakv")
