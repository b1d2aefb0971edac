"""StreamingLLM: attention sinks plus the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices
from vllm_kvcompress.policies.registry import register_policy


@register_policy("streaming")
class StreamingLLM(Policy):
    """Keep the first `sinks` tokens and the most recent budget - sinks; no score.

    Signals: none. Defaults: 4 sinks (paper); the recent part is the rest of the budget
    (the paper's R=512 with budget 516). The paper acts every decode step; here the window
    slides by `interval` tokens at each compression, which keeps the same set at that
    moment. Keys stay with their original RoPE positions (the paper re-rotates them to
    cache positions; we do not), so attention sees the true distances.
    """

    default_window = 0
    default_sinks = 4
    allocators = ("uniform", "pyramid")

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return slot_indices(batch).float().expand(batch.num_streams, -1)
