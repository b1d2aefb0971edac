"""Reuse of stored chunks at new positions: which tokens a request computes, and where the
reused KV goes.

A request's prompt tokens are either loaded from the chunk store (the chunks it names that
the store holds) or computed. Computed are: every token outside a loaded chunk, and a
fraction of each loaded chunk's tokens (`recompute`), chosen as Cache-Craft does: those
whose attention went most to text before the chunk when it was stored, since their KV
depends most on a context that is now different; "deviation" is CacheBlend's rule, the
tokens whose values at an early layer differ most between the stored KV and a fresh pass
of that layer over the whole prompt (the caller computes it); "random" picks uniformly,
the baseline. Loaded keys move from chunk positions 0..n-1 to start..start+n-1 by one RoPE
rotation by `start` (R(start + i) = R(start) R(i)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_kvcompress.scorers.rope import rotate
from vllm_kvcompress.sharing.chunk_store import ChunkStore, StoredChunk
from vllm_kvcompress.sharing.chunks import chunk_key

SELECTIONS = ("attention", "deviation", "random")
# The "deviation" selection's scores: [n] per hit, from the hits' (start, chunk).
DeviationScores = Callable[[list[tuple[int, StoredChunk]]], list[torch.Tensor]]


@dataclass
class LoadedChunk:
    """A stored chunk placed at `start` of the prompt; recompute: chunk offsets [r] int64
    computed anew (their stored KV is not used)."""

    start: int
    chunk: StoredChunk
    recompute: torch.Tensor


@dataclass
class ReusePlan:
    """computed [C] int64: prompt positions to compute, ascending; loaded: chunks read from
    the store; missed: (key, start, end) of named chunks computed in full (to be saved)."""

    computed: torch.Tensor
    loaded: list[LoadedChunk]
    missed: list[tuple[str, int, int]]

    @property
    def reused_tokens(self) -> int:
        return sum(c.chunk.length - c.recompute.numel() for c in self.loaded)


def select_recompute(chunk: StoredChunk, ratio: float, selection: str,
                     generator: torch.Generator | None = None,
                     deviation: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk offsets [round(ratio * n)] int64, ascending, to compute anew. deviation [n]:
    the per-token scores of the "deviation" selection."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"kv_chunk_recompute must be in [0, 1]; got {ratio}")
    if selection not in SELECTIONS:
        raise ValueError(f"chunk recompute selection must be one of {', '.join(SELECTIONS)}; "
                         f"got {selection!r}")
    count = math.floor(ratio * chunk.length + 0.5)
    if selection == "attention":
        picked = chunk.outside.topk(count).indices
    elif selection == "deviation":
        if deviation is None:
            raise ValueError("the deviation selection needs each chunk's value deviations")
        picked = deviation.topk(count).indices
    else:
        picked = torch.randperm(chunk.length, generator=generator)[:count]
    return picked.sort().values


def plan_reuse(token_ids: Sequence[int], spans: Sequence[tuple[int, int]], store: ChunkStore | None,
               model: str, ratio: float, selection: str = "attention",
               generator: torch.Generator | None = None,
               deviation: DeviationScores | None = None) -> ReusePlan:
    """Look the request's chunks up in `store` (None: reuse nothing) and plan its compute.
    deviation: for the "deviation" selection, [n] scores per hit from its (start, chunk)."""
    computed = torch.ones(len(token_ids), dtype=torch.bool)
    hits, missed = [], []
    for start, end in spans:
        key = chunk_key(token_ids[start:end], model)
        chunk = store.get(key) if store is not None else None
        if chunk is None or chunk.length != end - start:
            missed.append((key, start, end))
        else:
            hits.append((start, chunk))
    scores = deviation(hits) if selection == "deviation" and hits else [None] * len(hits)
    loaded = []
    for (start, chunk), score in zip(hits, scores):
        recompute = select_recompute(chunk, ratio, selection, generator, score)
        computed[start:start + chunk.length] = False
        computed[start + recompute] = True
        loaded.append(LoadedChunk(start, chunk, recompute))
    return ReusePlan(computed.nonzero()[:, 0], loaded, missed)


def placed(loaded: LoadedChunk, layer: int, theta: float,
           fix_rope: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of a loaded chunk at its prompt positions, recomputed tokens left out.

    Returns keys [H, k', D] (rotated by `start` unless fix_rope is False, the check that the
    rotation matters), values [H, k', D], positions [H, k'] int64; k' equal for all heads
    (a head whose stored tokens were recomputed more gets its slots masked as position -1).
    """
    chunk = loaded.chunk
    keys, values, offsets = chunk.keys[layer], chunk.values[layer], chunk.offsets[layer]
    if fix_rope:
        shift = torch.full((keys.shape[1],), loaded.start)
        keys = rotate(keys.transpose(0, 1), shift, theta).transpose(0, 1).to(values.dtype)
    positions = loaded.start + offsets
    recomputed = torch.isin(offsets, loaded.recompute)
    return keys, values, positions.masked_fill(recomputed, -1)
