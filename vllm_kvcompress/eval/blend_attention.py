"""The transformers hook for chunk reuse: attention over a cache that mixes KV loaded from
the chunk store with KV computed in this forward.

A model loaded with `attn_implementation=BLEND_ATTENTION` and called with `kv_blend=` a
BlendCache computes only the tokens it is given (at the positions given as
`position_ids`, in any subset of the prompt): each layer appends their fresh keys/values
to the layer's cache and lets every query attend to the cache entries at positions up to
its own. Loaded entries of recomputed tokens are masked out (position -1), so a recomputed
token is seen only with its fresh KV, as in CacheBlend and Cache-Craft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

BLEND_ATTENTION = "kvcompress_blend"
QUERY_BLOCK = 256   # bounds the probabilities to [H, G, 256, M] floats


@dataclass
class BlendLayer:
    """keys/values [H, M, D] (keys after RoPE at their positions); positions [H, M] int64,
    -1 for masked entries."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def empty(cls, heads: int, head_size: int, dtype: torch.dtype) -> BlendLayer:
        return cls(torch.empty(heads, 0, head_size, dtype=dtype),
                   torch.empty(heads, 0, head_size, dtype=dtype),
                   torch.empty(heads, 0, dtype=torch.long))

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """keys/values [H, S, D], positions [H, S]."""
        self.keys = torch.cat([self.keys, keys.to(self.keys.dtype)], dim=1)
        self.values = torch.cat([self.values, values.to(self.values.dtype)], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)


@dataclass
class ChunkStats:
    """Attention statistics of chunks computed in full, for the store (see StoredChunk):
    spans [(start, end)]; per span received [L, H, n] and outside [n] (summed over layers;
    divide by L for the mean). sinks: leading prompt tokens not counted as outside."""

    spans: list[tuple[int, int]]
    num_layers: int
    sinks: int = 4
    received: list[torch.Tensor] = field(default_factory=list)
    outside: list[torch.Tensor] = field(default_factory=list)

    def observe(self, layer: int, probs: torch.Tensor, query_positions: torch.Tensor,
                key_positions: torch.Tensor) -> None:
        """probs [H, G, S, M] of queries at query_positions [S] over keys at key_positions [H, M]."""
        heads = probs.shape[0]
        if not self.received:
            self.received = [torch.zeros(self.num_layers, heads, end - start)
                             for start, end in self.spans]
            self.outside = [torch.zeros(end - start) for start, end in self.spans]
        for index, (start, end) in enumerate(self.spans):
            rows = (query_positions >= start) & (query_positions < end)
            if not rows.any():
                continue
            block = probs[:, :, rows]                                        # [H, G, s, M]
            inside = (key_positions >= start) & (key_positions < end)        # [H, M]
            offsets = (key_positions - start).clamp(0, end - start - 1)
            self.received[index][layer].scatter_add_(1, offsets, block.sum(dim=(1, 2)) * inside)
            before = (key_positions >= self.sinks) & (key_positions < start)
            share = (block * before[:, None, None, :]).sum(-1).mean(dim=(0, 1))   # [s]
            self.outside[index][query_positions[rows] - start] += share


class ProbeTaken(Exception):
    """Ends a forward at BlendCache.stop_at once that layer's values are taken."""


@dataclass
class BlendCache:
    """One BlendLayer per layer; stats: statistics to collect in this forward, or None;
    stop_at: a layer whose fresh values [H, S, D] go to `probe`, ending the forward there."""

    layers: list[BlendLayer]
    stats: ChunkStats | None = None
    stop_at: int | None = None
    probe: torch.Tensor | None = None


def blend_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                    dropout: float = 0.0, *, kv_blend: BlendCache, position_ids: torch.Tensor,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, Hq, S, D], key/value [1, H, S, D], position_ids [1, S] -> ([1, S, Hq, D], None)."""
    if module.layer_idx == kv_blend.stop_at:
        kv_blend.probe = value[0]
        raise ProbeTaken
    layer = kv_blend.layers[module.layer_idx]
    _, query_heads, new, head_size = query.shape
    heads = key.shape[1]
    positions = position_ids[0]
    layer.append(key[0], value[0], positions.expand(heads, -1))
    queries = query[0].view(heads, query_heads // heads, new, head_size).float()
    keys, values = layer.keys.float(), layer.values.float()
    key_positions = layer.positions
    outputs = []
    for first in range(0, new, QUERY_BLOCK):
        block_positions = positions[first:first + QUERY_BLOCK]
        scores = torch.einsum("hgsd,hmd->hgsm", queries[:, :, first:first + QUERY_BLOCK], keys)
        allowed = (key_positions >= 0)[:, None, :] & (
            key_positions[:, None, :] <= block_positions[None, :, None])          # [H, s, M]
        probs = torch.softmax((scores * scaling).masked_fill(~allowed[:, None], float("-inf")), -1)
        if kv_blend.stats is not None:
            kv_blend.stats.observe(module.layer_idx, probs, block_positions, key_positions)
        outputs.append(torch.einsum("hgsm,hmd->hgsd", probs, values))
    output = torch.cat(outputs, dim=2).reshape(query_heads, new, head_size).transpose(0, 1)
    return output[None].to(query.dtype), None


AttentionInterface.register(BLEND_ATTENTION, blend_attention)
