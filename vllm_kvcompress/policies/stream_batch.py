"""What a policy sees of one layer's streams: a padded, request-major batch.

A *stream* is one request's KV for one KV head of one layer. A policy gets a batch of
streams of ONE layer, padded to a common length T with per-stream lengths, and the batch is
request-major: stream n belongs to request n // num_kv_heads and KV head n % num_kv_heads,
so `x.view(R, H, ...)` groups the heads of a request (head-wise budgets need that).

Slots are in original token order: slot t < lengths[n] is live, slots beyond are padding
(their content is undefined, NaN included; every policy ignores them). A stream's low-bit
tier (policies that demote, selection.py) is not part of the batch: it is stored apart and
never re-selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamBatch:
    """One layer's streams, padded.  N = R * H streams, T = padded length, D = head size.

    keys, values:     [N, T, D]  keys after RoPE, as stored in the cache
    lengths:          [N] int64  live slots per stream
    positions:        [N, T] int64  original token position of each slot (-1 in padding)
    acc_scores:       [N, T] float32  accumulated attention: for each slot, the sum over
                      every query that has attended it so far (prefill and decode) and over
                      the G query heads of the KV head's group, of the softmax probability.
                      Zeros when the caller does not track it (see Policy.needs_accumulated).
    window_queries:   [N, G, W, D] | None  the last W queries (after RoPE) of the G query
                      heads of each stream's group, oldest first; None when not asked for
                      (W >= Policy.query_window when Policy.needs_window_queries).
    window_positions: [N, W] int64 | None  token positions of those queries (-1 = absent,
                      when the request has fewer than W tokens).
    num_kv_heads:     H
    first_head:       the model's index of the first of the H heads (tensor parallelism)
    layer:            index of this layer, num_layers: how many layers the model has
    scale:            softmax scale of the attention (usually D ** -0.5)
    layer_densities:  [R, num_layers] float32 | None  D2O only (Policy.needs_layer_densities):
                      each request's attention density of every layer, from
                      budgets.attention_density on that layer's acc_scores at prefill.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    acc_scores: torch.Tensor
    num_kv_heads: int
    layer: int
    num_layers: int
    scale: float
    window_queries: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    layer_densities: torch.Tensor | None = None
    first_head: int = 0

    @property
    def num_streams(self) -> int:
        return self.keys.shape[0]

    @property
    def num_requests(self) -> int:
        return self.num_streams // self.num_kv_heads

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def live_mask(self) -> torch.Tensor:
        """[N, T] bool, True on live slots."""
        return slot_indices(self) < self.lengths[:, None]

    def require_window_queries(self, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(window_queries, window_positions), or a clear error when the caller gave none."""
        if self.window_queries is None or self.window_positions is None:
            raise ValueError(f"policy {policy!r} needs window_queries and window_positions "
                             "in the StreamBatch (Policy.needs_window_queries)")
        return self.window_queries, self.window_positions


def slot_indices(batch: StreamBatch) -> torch.Tensor:
    """[1, T] int64 slot indices, broadcastable over streams."""
    return torch.arange(batch.max_len, device=batch.lengths.device)[None, :]
