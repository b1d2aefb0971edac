"""Replacement policies by name, one interface for vLLM's prefix cache and the chunk store.

`lru` is vLLM's own order; `predicted` is the marking algorithm following one-bit
discard predictions, `predicted-phase` the same with phase predictions (marking.py).
"""

from __future__ import annotations

from vllm_kvcompress.sharing.replacement.base import Page, ReplacementPolicy, chain_bits
from vllm_kvcompress.sharing.replacement.lru import LRU
from vllm_kvcompress.sharing.replacement.marking import Marking

REPLACEMENT_POLICIES = ("lru", "predicted", "predicted-phase")


def make_replacement(name: str, capacity: int) -> ReplacementPolicy:
    """The policy `name` for a store of `capacity` pages."""
    if name == "lru":
        return LRU()
    if name == "predicted":
        return Marking(capacity, bits="discard")
    if name == "predicted-phase":
        return Marking(capacity, bits="phase")
    raise ValueError(f"replacement policy {name!r}: allowed values are "
                     f"{', '.join(REPLACEMENT_POLICIES)}")


__all__ = ["LRU", "Marking", "Page", "REPLACEMENT_POLICIES", "ReplacementPolicy",
           "chain_bits", "make_replacement"]
