"""Attention of new tokens over per-head streams, accumulating each slot's probability."""

from __future__ import annotations

import torch

from vllm_kvcompress.eval.layer_streams import LayerStreams


def attend_new_tokens(streams: LayerStreams, queries: torch.Tensor, scale: float,
                      chunk: int, accumulate: bool = True) -> torch.Tensor:
    """Causal attention of the S newest tokens of every stream; returns [H, G, S, D].

    queries: [H, G, S, D] after RoPE, for tokens already appended as each stream's last S
    live slots. Query i sees the stream's older slots and new slots up to itself, and its
    low-bit tier (all older), in one softmax. Adds the probabilities of the full tier's
    slots, summed over queries and the G heads of each group, to `streams.acc_scores`
    (unless not `accumulate`: they hold a trained scorer's scores then).
    Works `chunk` queries at a time so prefill memory stays at [H, G, chunk, T]
    probabilities; computed in float32.
    """
    heads, group, new, head_size = queries.shape
    first_new = streams.lengths - new                                             # [H]
    low = streams.low if streams.low is not None and streams.low.positions.shape[1] else None
    outputs = []
    for start in range(0, new, chunk):
        stop = min(new, start + chunk)
        # Slots t < limit[h, i] are visible to query i of head h.
        limit = first_new[:, None] + torch.arange(start + 1, stop + 1)[None, :]   # [H, c]
        width = int(limit.max())
        keys = streams.keys[:, :width].float()
        values = streams.values[:, :width].float()
        block = queries[:, :, start:stop].float().reshape(heads, group * (stop - start), head_size)
        logits = torch.matmul(block, keys.transpose(1, 2)).view(heads, group, stop - start, width)
        visible = torch.arange(width)[None, None, :] < limit[:, :, None]          # [H, c, T]
        logits = logits.mul_(scale).masked_fill_(~visible[:, None], -torch.inf)
        if low is not None:
            low_logits = torch.matmul(block, low.keys.transpose(1, 2)).view(
                heads, group, stop - start, -1).mul_(scale)
            low_logits.masked_fill_((low.positions < 0)[:, None, None, :], -torch.inf)
            logits = torch.cat([low_logits, logits], dim=-1)
        probs = torch.softmax(logits, dim=-1)
        output = 0.0
        if low is not None:
            low_width = low.positions.shape[1]
            output = torch.matmul(probs[..., :low_width].reshape(heads, -1, low_width), low.values)
            probs = probs[..., low_width:]
        if accumulate:
            streams.acc_scores[:, :width] += probs.sum(dim=(1, 2))
        output = output + torch.matmul(probs.reshape(heads, -1, width), values)
        outputs.append(output.view(heads, group, stop - start, head_size))
    return torch.cat(outputs, dim=2)
