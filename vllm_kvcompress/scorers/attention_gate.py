"""Attention-Gate: per layer and KV head, a small attention over the request's context so
far followed by an MLP, emitting each token's keep logit from the token in its context.

Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate" (2024). The
paper's gate reads the layer's hidden states with a reduced softmax attention; ours reads,
like the retaining heads, each KV head's [q_1..q_G, k, v] with RoPE undone (what the
attention layer receives; tensor-parallel without gathering), and its attention is causal
*linear* attention (positive feature maps), whose context is a running state of F x (E + 1)
numbers per request, layer and KV head. So a token's score depends on all tokens before it
however vLLM splits the request into steps (chunked prefill, decode), and the gate never
rereads the (compressed) cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_kvcompress.scorers.trained_scorer import ModelShape, TrainedScorer, register_scorer

# Rows per block of the causal linear attention: bounds the [H, b, b] scores of a long prompt.
BLOCK = 256


@register_scorer
class AttentionGates(TrainedScorer):
    """Per (layer, KV head): embed e = silu(x W_in) [E]; context = causal linear attention
    with queries phi(e W_q), keys phi(e W_k) [F = E/2], phi = elu + 1, values e;
    logit = MLP([e, context]). E = hidden.

    Parameters: w_in [L, H, I, E], b_in [L, H, E], w_q / w_k [L, H, E, F],
    w_out [L, H, 2E, E], b_out [L, H, E], w_logit [L, H, E], b_logit [L, H].
    State per request: [H, F * (E + 1)] (the keys' sums against values and ones).
    """

    kind = "gate"

    def __init__(self, shape: ModelShape, hidden: int = 32):
        super().__init__(shape, hidden)
        layers, heads, inputs = shape.num_layers, shape.num_kv_heads, shape.inputs
        features = hidden // 2

        def weight(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(layers, heads, *size) * size[0] ** -0.5)

        def bias(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(layers, heads, *size))

        self.w_in, self.b_in = weight(inputs, hidden), bias(hidden)
        self.w_q, self.w_k = weight(hidden, features), weight(hidden, features)
        self.w_out, self.b_out = weight(2 * hidden, hidden), bias(hidden)
        self.w_logit, self.b_logit = weight(hidden), bias()

    @property
    def state_size(self) -> int:
        return (self.hidden // 2) * (self.hidden + 1)

    def forward(self, layer: int, features: torch.Tensor, first_head: int = 0,
                segments: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> torch.Tensor:
        """[S, H'] keep logits of KV heads first_head .. for features [S, H', I].

        segments [R + 1]: row offsets of the R requests (None: one request); state
        [R, H', state_size]: their contexts before these rows, updated in place (None:
        empty contexts, not kept)."""
        heads = slice(first_head, first_head + features.shape[1])
        x = features * self.in_scale[layer, heads]
        embed = F.silu(torch.einsum("shi,hie->hse", x, self.w_in[layer, heads])
                       + self.b_in[layer, heads, None])                              # [H', S, E]
        queries = F.elu(embed @ self.w_q[layer, heads]) + 1                          # [H', S, F]
        keys = F.elu(embed @ self.w_k[layer, heads]) + 1
        values = torch.cat([embed, embed.new_ones(*embed.shape[:2], 1)], dim=-1)    # [H', S, E+1]
        if segments is None:
            segments = torch.tensor([0, features.shape[0]])
        if state is None:
            state = embed.new_zeros(len(segments) - 1, *keys.shape[::2], values.shape[-1])
        else:
            state = state.view(len(segments) - 1, -1, keys.shape[-1], values.shape[-1])
        mixed = _causal_linear_attention(queries, keys, values, segments, state)
        context = mixed[..., :-1] / mixed[..., -1:]
        hidden = F.silu(torch.einsum("hse,hef->hsf", torch.cat([embed, context], dim=-1),
                                     self.w_out[layer, heads]) + self.b_out[layer, heads, None])
        logits = (hidden * self.w_logit[layer, heads, None]).sum(-1) + self.b_logit[layer, heads, None]
        return logits.T


def _causal_linear_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             segments: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """[H, S, V] sum over earlier-or-same rows j of the segment (and the state) of
    (q_t . k_j) v_j, for queries/keys [H, S, F], values [H, S, V]; state [R, H, F, V] holds
    each segment's sum of k_j v_j^T before its rows and is advanced past them in place."""
    bounds = segments.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    out = torch.empty_like(values)
    singles = [r for r, n in enumerate(lengths) if n == 1]
    if singles:  # decode steps: one row per request, all at once
        rows = torch.tensor([bounds[r] for r in singles])
        q, k, v = queries[:, rows], keys[:, rows], values[:, rows]                  # [H, R1, *]
        held = state[singles].transpose(0, 1) + k[..., :, None] * v[..., None, :]   # [H, R1, F, V]
        out[:, rows] = torch.einsum("hrf,hrfv->hrv", q, held)
        state[singles] = held.transpose(0, 1)
    for r, n in enumerate(lengths):
        if n < 2:
            continue
        held = state[r].clone()  # [H, F, V]; the first block's product keeps it for backward
        for start in range(bounds[r], bounds[r + 1], BLOCK):
            rows = slice(start, min(start + BLOCK, bounds[r + 1]))
            q, k, v = queries[:, rows], keys[:, rows], values[:, rows]
            within = (q @ k.transpose(1, 2)).tril()                                  # [H, b, b]
            out[:, rows] = q @ held + within @ v
            held = held + k.transpose(1, 2) @ v
        state[r] = held
    return out
