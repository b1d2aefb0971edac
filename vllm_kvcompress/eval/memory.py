"""KV memory in bytes: what a policy holds per stream, and budgets chosen by target memory.

Quality is compared at equal KV bytes once tiers differ in size: a low-bit row is a
fraction of a full token. Bytes are counted as vLLM stores them, in the model's own dtype
(the checkpoint's, bf16 for the bundled model) whatever dtype a runner computes in, with
the packed rows of kernels/low_bit.py for low-bit tiers; a head-block's unused tail is not
counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvcompress.cache.second_tier import row_format
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier


@dataclass(frozen=True)
class KVShape:
    """A model's KV cache: layers, KV heads, head size and bytes per element."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype_bytes: int

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one stream (one layer, one KV head) at full precision."""
        return 2 * self.head_size * self.dtype_bytes

    def row_fraction(self, policy: Policy, budget: int) -> float:
        """A second-tier row's bytes over a full token's (0 without a second tier)."""
        tier = policy.second_tier_for(budget, self.head_size)
        if tier is None:
            return 0.0
        dtype = {1: torch.int8, 2: torch.bfloat16, 4: torch.float32}[self.dtype_bytes]
        return row_format(tier, self.head_size, dtype).row_bytes / self.token_bytes

    @classmethod
    def of_model(cls, model: str | Path) -> KVShape:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_size,
                   dtype.itemsize)


@dataclass(frozen=True)
class KVMemory:
    """What a request's streams held (kept_bytes) against full precision (dense_bytes)."""

    kept_bytes: int
    dense_bytes: int

    @property
    def fraction(self) -> float:
        return self.kept_bytes / self.dense_bytes if self.dense_bytes else 1.0


def stream_tokens(policy: Policy, budget: int, num_tokens: int, shape: KVShape) -> float:
    """KV memory of one stream of `num_tokens` compressed to `budget` (once), in full
    tokens: the full tier plus the second tier's rows. A low-bit tier holds every other
    token, up to its cap; a narrow-key tier (ThinK) every kept token but the last
    `recent` (the policy's option). A stream no longer than the budget is not compressed
    (the schedule's trigger), so it holds every token at full precision."""
    if num_tokens <= budget:
        return float(num_tokens)
    kept = min(policy.full_budget(budget), num_tokens)
    tier = policy.second_tier_for(budget, shape.head_size)
    if isinstance(tier, LowBitTier):
        low = num_tokens - kept if tier.cap is None else min(num_tokens - kept, tier.cap)
        return kept + low * shape.row_fraction(policy, budget)
    if isinstance(tier, NarrowKeyTier) and kept < num_tokens:
        narrow = max(kept - policy.options["recent"], 0)
        return kept - narrow + narrow * shape.row_fraction(policy, budget)
    return float(kept)


def budget_for_memory(policy: Policy, fraction: float, num_tokens: int, shape: KVShape) -> int:
    """The largest budget whose stream holds at most `fraction` of the full KV bytes of
    `num_tokens` tokens; ValueError when even budget 1 holds more (a low-bit tier too big
    for that memory: lower its bits or cap it)."""
    target = fraction * num_tokens
    if stream_tokens(policy, 1, num_tokens, shape) > target:
        raise ValueError(f"policy {policy.name!r} holds more than {100 * fraction:g}% of the KV "
                         f"bytes of {num_tokens} tokens at any budget (its low-bit tier alone "
                         f"takes {100 * shape.row_fraction(policy, 1):.1f}%): give it fewer bits "
                         "or a lowbit_budget")
    low, high = 1, num_tokens
    while low < high:                        # memory grows with the budget
        middle = (low + high + 1) // 2
        if stream_tokens(policy, middle, num_tokens, shape) <= target:
            low = middle
        else:
            high = middle - 1
    return low


def held_memory(full_lengths: torch.Tensor, low_lengths: torch.Tensor, num_tokens: int,
                policy: Policy | None, budget: int | None, shape: KVShape) -> KVMemory:
    """Bytes held by streams with full_lengths and second-tier low_lengths (any shape,
    summed) after `num_tokens` tokens, against all of them at full precision."""
    kept = int(full_lengths.sum()) * shape.token_bytes
    if policy is not None:
        fraction = shape.row_fraction(policy, budget)
        kept += round(int(low_lengths.sum()) * fraction * shape.token_bytes)
    dense = num_tokens * shape.num_layers * shape.num_kv_heads * shape.token_bytes
    return KVMemory(kept, dense)
