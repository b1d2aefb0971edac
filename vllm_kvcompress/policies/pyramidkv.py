"""PyramidKV: SnapKV scores with per-layer budgets shaped like a pyramid.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024).
"""

from __future__ import annotations

from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.snapkv import SnapKV


@register_policy("pyramidkv")
class PyramidKV(SnapKV):
    """SnapKV scoring and selection; layer l keeps B_l + W with B_l decreasing linearly
    from max = 2(C-W) - min in layer 0 to about min = floor((C-W)/beta) in the last layer
    (budgets.pyramid_budgets, clipped to the stream's length).

    Signals: window queries. Defaults: beta=20, W=32, SnapKV's pooling (max, kernel 7).
    Memory: pages are shared by all layers, so the scheduler accounts every layer at the
    largest layer budget (max_layer_budget). allocator: pyramid_adakv adds Ada-KV's
    head-wise split inside each layer.
    """

    allocators = ("pyramid", "pyramid_adakv")
