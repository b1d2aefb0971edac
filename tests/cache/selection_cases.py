"""Random Selections over gathered streams, and what compacting with them must give:
policies.apply.apply_selection (the padded definition) on the same streams, and
cache.low_tier.low_tier_after for the low-bit tier."""

from __future__ import annotations

import torch

from vllm_kvcompress.cache import StreamView
from vllm_kvcompress.cache.low_tier import LowTierView, frozen_balance, low_tier_after
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies import apply_selection
from vllm_kvcompress.policies.selection import LowBitTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

KINDS = ("evict", "merge", "merge_unnormalized", "value_merge", "demote", "prune",
         "everything")
TIER = LowBitTier(key_bits=3, value_bits=2, cap=6)


def batch_of(view: StreamView, num_kv_heads: int) -> StreamBatch:
    return StreamBatch(keys=view.keys, values=view.values, lengths=view.lengths,
                       positions=view.positions, acc_scores=view.scores,
                       num_kv_heads=num_kv_heads, layer=0, num_layers=1, scale=1.0)


def expected_after(view: StreamView, selection: Selection, num_kv_heads: int) -> StreamView:
    out = apply_selection(batch_of(view, num_kv_heads), selection)
    return StreamView(out.keys, out.values, out.positions, out.acc_scores, out.lengths)


def expected_low_after(old: LowTierView, old_balance: torch.Tensor, view: StreamView,
                       selection: Selection, num_kv_heads: int) -> tuple[LowTierView, torch.Tensor]:
    """The low tier after compacting `view` with `selection`, and the streams' balancing
    (old_balance [N, D]: zeros = none fixed yet)."""
    balance = frozen_balance(old_balance, selection.key_balance)
    fmt = LowBitFormat(view.keys.shape[-1], TIER.key_bits, TIER.value_bits)
    return low_tier_after(old, batch_of(view, num_kv_heads), selection, TIER, fmt, balance), balance


def empty_low_tier(num_streams: int, head_dim: int) -> LowTierView:
    return LowTierView(torch.zeros(num_streams, 0, head_dim), torch.zeros(num_streams, 0, head_dim),
                       torch.zeros(num_streams, 0, dtype=torch.long), torch.zeros(num_streams, 0),
                       torch.zeros(num_streams, dtype=torch.long))


def random_selection(view: StreamView, seed: int, keep_prob: float = 0.6,
                     kind: str = "evict") -> Selection:
    """A random Selection of `kind` (see KINDS) over `view`. Merges send evicted slots to a
    random slot of their stream (sometimes an evicted one, which apply_selection drops);
    demotions (to a TIER) pick random evicted slots."""
    gen = torch.Generator().manual_seed(seed)
    num_streams, max_len, head_dim = view.keys.shape
    live = torch.arange(max_len)[None, :] < view.lengths[:, None]
    keep = (torch.rand(num_streams, max_len, generator=gen) < keep_prob) & live
    selection = Selection(keep=keep)

    def random_slots(*shape):
        return torch.randint(-1, max(max_len, 1), shape, generator=gen)

    if kind in ("merge", "merge_unnormalized", "everything"):
        selection.merge_into = torch.where(keep, torch.arange(max_len),
                                           random_slots(num_streams, max_len))
        selection.weights = torch.rand(num_streams, max_len, generator=gen)
        selection.weights[torch.rand(num_streams, max_len, generator=gen) < 0.1] = 0.0
        selection.normalize_merges = kind != "merge_unnormalized"
    if kind in ("value_merge", "everything"):
        selection.value_merge_into = random_slots(num_streams, max_len, 2)
        selection.value_merge_weights = torch.rand(num_streams, max_len, 2, generator=gen)
    if kind in ("demote", "everything"):
        merged = (torch.zeros_like(keep) if selection.merge_into is None
                  else selection.merge_into >= 0)
        selection.demote = (torch.rand(num_streams, max_len, generator=gen) < 0.7) & ~keep & ~merged
        selection.demote_scores = torch.rand(num_streams, max_len, generator=gen)
        selection.low_tier = TIER
        selection.key_balance = 0.5 + torch.rand(num_streams, head_dim, generator=gen)
    if kind in ("prune", "everything"):
        selection.key_channel_mask = torch.rand(num_streams, head_dim, generator=gen) < 0.7
        selection.key_pruned_slots = torch.rand(num_streams, max_len, generator=gen) < 0.8
    return selection
