"""The hook into transformers: an attention function that runs over LayerStreams.

Registered with transformers' AttentionInterface under ATTENTION_NAME; a model loaded
with `attn_implementation=ATTENTION_NAME` calls it in every attention layer with the
layer's queries, keys and values after RoPE (computed at the positions the caller passed
as `position_ids`). No causal mask is built for unknown implementations, and no
transformers Cache is used: the streams passed as the `kv_streams` keyword are the cache.
A trained scorer passed as `kv_scorer` scores the new tokens as they are written (their
acc_scores; a stateful one keeps its context in the streams), and attention is then not
accumulated.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from vllm_kvcompress.eval.layer_streams import LayerStreams
from vllm_kvcompress.eval.stream_attention import attend_new_tokens

ATTENTION_NAME = "kvcompress_streams"
# Prefill queries per attention block: bounds the probabilities to [H, G, 256, T] floats
# (256 was the fastest of 128-1024 on a 2-core CPU at 4k tokens).
PREFILL_CHUNK = 256


def streams_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                      dropout: float = 0.0, *, kv_streams: list[LayerStreams],
                      position_ids: torch.Tensor, kv_scorer=None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, Hq, S, D], key/value [1, H, S, D], position_ids [1, S] -> ([1, S, Hq, D], None).

    Appends the new keys/values to the layer's streams, slides its query window, attends.
    """
    streams = kv_streams[module.layer_idx]
    _, query_heads, new, head_size = query.shape
    heads = key.shape[1]
    positions = position_ids[0]
    queries = query[0].view(heads, query_heads // heads, new, head_size)
    scores = None
    if kv_scorer is not None:
        if streams.scorer_state is None:
            streams.scorer_state = kv_scorer.new_state(1, heads)
        scores = kv_scorer.score(module.layer_idx, queries.permute(2, 0, 1, 3),
                                 key[0].transpose(0, 1), value[0].transpose(0, 1), positions,
                                 state=streams.scorer_state).T
    streams.append(key[0], value[0], positions, scores)
    streams.push_queries(queries, positions)
    output = attend_new_tokens(streams, queries, scaling, PREFILL_CHUNK,
                               accumulate=kv_scorer is None)
    return output.reshape(query_heads, new, head_size).transpose(0, 1)[None].to(query.dtype), None


AttentionInterface.register(ATTENTION_NAME, streams_attention)
