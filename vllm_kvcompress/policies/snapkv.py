"""SnapKV: observation-window attention, pooled, decides what the prompt keeps.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.options import choice, integer
from vllm_kvcompress.policies.stream_batch import StreamBatch
from vllm_kvcompress.policies.registry import register_policy
from vllm_kvcompress.policies.scoring import pool_scores, window_attention


@register_policy("snapkv")
class SnapKV(Policy):
    """Score = attention of the last W queries onto each key (softmax over all the
    stream's keys, causal by position), GQA aggregated over the group (mean or max),
    smoothed by 1-D pooling over the slots before the window; keep the top (C - W) plus
    the whole window.

    Signals: window queries. Defaults: W=32, max pooling with kernel 7 (the paper's
    LongBench runs; the authors' library defaults are avg pooling, kernel 5: set
    `pool: avg, pool_kernel: 5`). The paper compresses once, at the end of prefill and only
    if L >= C; here the same rule also runs at each later compression (every `interval`
    tokens), with the latest W queries, so long generations stay within budget.
    Options: allocator (uniform; pyramid = PyramidKV, adakv = Ada-KV), gqa_reduce.
    """

    needs_window_queries = True
    default_window = 32
    default_sinks = 0
    allocators = ("uniform", "pyramid", "adakv", "pyramid_adakv")
    options_spec = {
        "pool": choice("max", "max", "avg", "none"),
        "pool_kernel": integer(7, 1, odd=True),
        "gqa_reduce": choice("mean", "mean", "max"),
    }

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return pooled_window_scores(self, batch)


def pooled_window_scores(policy: Policy, batch: StreamBatch) -> torch.Tensor:
    """[N, T] SnapKV's score, with the policy's window and options gqa_reduce, pool and
    pool_kernel: window attention, pooled only before the window (kept anyway)."""
    queries, query_positions = batch.require_window_queries(policy.name)
    options = policy.options
    scores = window_attention(queries, batch.keys, batch.lengths, batch.positions,
                              query_positions, batch.scale, options["gqa_reduce"])
    if options["pool"] == "none":
        return scores
    before_window = (batch.lengths - policy.window).clamp(min=0)
    return pool_scores(scores, before_window, options["pool_kernel"], options["pool"])
