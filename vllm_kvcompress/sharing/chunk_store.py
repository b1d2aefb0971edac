"""A byte-bounded store of chunks' KV, at positions from 0, with the statistics that the
choice of tokens to recompute needs; which chunk leaves is its replacement policy's choice
(sharing/replacement/: LRU by default, or the marking policy with one-bit hints).

A chunk is saved the first time a request computes it in full, with its keys rotated back
to chunk positions 0..n-1, so loading it anywhere is one rotation (sharing/chunk_reuse.py).
It may be stored compressed, keeping a fraction of its tokens by a score that knows no
later question: "attention" (the attention a token received from the chunk's own tokens,
per layer and KV head) or "surprisal" (how unexpected the token was to the model where it
was computed, -log p; the same tokens in every head: rare names and numbers, the facts a
question will ask for, are what the model could not predict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_kvcompress.sharing.replacement import LRU, ReplacementPolicy

CHUNK_SCORES = ("attention", "surprisal")


@dataclass
class StoredChunk:
    """One chunk's KV. L layers, H KV heads, k stored tokens per head of the chunk's n, D.

    keys/values [L, H, k, D]: keys after RoPE at their chunk offsets; offsets [L, H, k]
    int64 (the stored tokens' indices in the chunk, ascending); outside [n] float32: the
    share of each token's attention that went to text before the chunk (mean over layers
    and query heads, sink tokens excluded); received [L, H, n] float32: attention each
    token received from the chunk's own tokens; surprisal [n] float32: -log p of each token
    given the text before it when the chunk was computed (inf where unknown).
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    outside: torch.Tensor
    received: torch.Tensor
    surprisal: torch.Tensor

    @property
    def length(self) -> int:
        return self.outside.shape[0]

    @property
    def stored_tokens(self) -> int:
        return self.offsets.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.keys, self.values, self.offsets, self.outside, self.received,
                    self.surprisal))

    def compressed(self, fraction: float, score: str = "attention") -> StoredChunk:
        """The chunk with ceil(fraction * n) tokens per layer and KV head, those with the
        highest `score` (CHUNK_SCORES; the first token always kept: a chunk-local sink)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"kv_chunk_budget must be in (0, 1]; got {fraction}")
        if score not in CHUNK_SCORES:
            raise ValueError(f"kv_chunk_score must be one of {', '.join(CHUNK_SCORES)}; "
                             f"got {score!r}")
        keep = max(1, math.ceil(fraction * self.length))
        if keep >= self.stored_tokens:
            return self
        per_token = (self.received if score == "attention"
                     else self.surprisal.expand_as(self.received))
        ranked = torch.full_like(self.received, float("-inf"))  # only stored tokens compete
        ranked.scatter_(2, self.offsets, per_token.gather(2, self.offsets))
        ranked[..., 0] = torch.where(self.offsets[..., 0] == 0, float("inf"), ranked[..., 0])
        kept = ranked.topk(keep, dim=-1).indices.sort(dim=-1).values     # [L, H, keep]
        slots = _slots_of(self.offsets, kept)
        gather = slots[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        return StoredChunk(keys=self.keys.gather(2, gather), values=self.values.gather(2, gather),
                           offsets=kept, outside=self.outside, received=self.received,
                           surprisal=self.surprisal)


def _slots_of(offsets: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Indices into the stored slots [L, H, k] of the chunk offsets `wanted` [L, H, j]."""
    return torch.searchsorted(offsets.contiguous(), wanted.contiguous())


class ChunkStore:
    """Chunks by key, at most `capacity_bytes` in all. A chunk is pinned only while the
    store touches it, so every stored chunk is evictable between requests; `replacement`
    picks the victims (the same interface as vLLM's prefix cache, one chunk per page)."""

    def __init__(self, capacity_bytes: int, replacement: ReplacementPolicy | None = None):
        if capacity_bytes <= 0:
            raise ValueError(f"kv_chunk_store_gib must be positive; got {capacity_bytes} bytes")
        self.capacity_bytes = capacity_bytes
        self.replacement = replacement if replacement is not None else LRU()
        self._chunks: dict[str, StoredChunk] = {}
        self.bytes = 0
        self.lookups = 0
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._chunks)

    def __contains__(self, key: str) -> bool:
        return key in self._chunks

    def get(self, key: str, discard: bool | None = None) -> StoredChunk | None:
        """The chunk or None, counted as a lookup; `discard` is this use's one-bit hint
        ("no further use expected") for the replacement policy."""
        self.lookups += 1
        self.replacement.note_lookup([key], int(key in self._chunks))
        chunk = self._chunks.get(key)
        if chunk is not None:
            self.hits += 1
            self.replacement.pin(key)
            self.replacement.release(key, discard)
        return chunk

    def put(self, key: str, chunk: StoredChunk, discard: bool | None = None) -> bool:
        """Store `chunk` under `key`, evicting the policy's victims until it fits; False
        (nothing stored or evicted) if it alone exceeds the capacity."""
        if chunk.nbytes > self.capacity_bytes:
            return False
        if key in self._chunks:
            self.replacement.drop(key)
            self.bytes -= self._chunks.pop(key).nbytes
        while self.bytes + chunk.nbytes > self.capacity_bytes:
            victim = self.replacement.pop_victim()
            self.bytes -= self._chunks.pop(victim).nbytes
            self.evictions += 1
        self._chunks[key] = chunk
        self.bytes += chunk.nbytes
        self.replacement.release(key, discard)
        return True
