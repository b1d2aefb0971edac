"""Locret's retaining heads: per layer and KV head, an MLP that predicts how much attention
later queries will pay a token, from the token's own q, k, v.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads" (2024). The paper's head reads the layer's whole [q, k, v]; ours reads,
per KV head, the q of the G query heads of its group plus its k and v (G*D + 2D inputs),
so that under tensor parallelism each rank scores its own KV heads without gathering.
Keys and queries arrive after RoPE and are rotated back first (scorers/rope.py), so a
token scores the same at any position.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_kvcompress.scorers.trained_scorer import (SCORE_STEP, ModelShape, TrainedScorer,
                                                    register_scorer)


@register_scorer
class RetainingHeads(TrainedScorer):
    """One MLP per (layer, KV head): [q_1..q_G, k, v] (I = G*D + 2D) -> hidden -> 1 score.

    Parameters: w1 [L, H, I, hidden], b1 [L, H, hidden], w2 [L, H, hidden], b2 [L, H].
    """

    kind = "locret"

    def __init__(self, shape: ModelShape, hidden: int = 64):
        super().__init__(shape, hidden)
        self._scaled_w1: torch.Tensor | None = None
        layers, heads, inputs = shape.num_layers, shape.num_kv_heads, shape.inputs
        self.w1 = nn.Parameter(torch.randn(layers, heads, inputs, hidden) * inputs ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(layers, heads, hidden))
        self.w2 = nn.Parameter(torch.randn(layers, heads, hidden) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(layers, heads))

    def forward(self, layer: int, features: torch.Tensor, first_head: int = 0,
                segments: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> torch.Tensor:
        """[S, H'] scores of KV heads first_head .. first_head + H' - 1 for features
        [S, H', I]; each token on its own (no segments, no state)."""
        heads = slice(first_head, first_head + features.shape[1])
        x = features * self.in_scale[layer, heads]
        hidden = torch.einsum("shi,hio->sho", x, self.w1[layer, heads]) + self.b1[layer, heads]
        hidden = nn.functional.silu(hidden)
        return (hidden * self.w2[layer, heads]).sum(-1) + self.b2[layer, heads]

    @torch.no_grad()
    def score(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor, first_head: int = 0, segments: torch.Tensor | None = None,
              state: torch.Tensor | None = None) -> torch.Tensor:
        """As TrainedScorer.score, by frozen heads: `forward` in two batched matmuls with
        in_scale folded into w1 (scoring runs in every layer of every step)."""
        if self._scaled_w1 is None:
            self._scaled_w1 = (self.w1 * self.in_scale[..., None]).detach()
        heads = slice(first_head, first_head + keys.shape[1])
        x = self.features(queries, keys, values, positions).transpose(0, 1)        # [H', S, I]
        hidden = torch.baddbmm(self.b1[layer, heads, None], x, self._scaled_w1[layer, heads])
        scores = torch.bmm(nn.functional.silu(hidden, inplace=True), self.w2[layer, heads, :, None])
        scores = scores[..., 0].T + self.b2[layer, heads]
        return torch.round(scores / SCORE_STEP) * SCORE_STEP
