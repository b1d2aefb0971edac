"""Random Selections over gathered streams, and what compacting with them must give:
policies.apply.apply_selection (the padded definition) on the same streams, and
cache.low_tier.low_tier_after for the low-bit tier."""

from __future__ import annotations

import torch

from vllm_kvcompress.cache import StreamView
from vllm_kvcompress.cache.low_tier import low_tier_after
from vllm_kvcompress.cache.narrow_tier import settle_narrowing
from vllm_kvcompress.cache.second_tier import TierView, frozen_scales
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.policies import apply_selection
from vllm_kvcompress.policies.selection import LowBitTier, NarrowKeyTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

KINDS = ("evict", "merge", "merge_unnormalized", "value_merge", "demote", "narrow",
         "everything", "everything_narrow")
TIER = LowBitTier(key_bits=3, value_bits=2, cap=6)
NARROW = NarrowKeyTier(pruning_ratio=0.25)


def batch_of(view: StreamView, num_kv_heads: int) -> StreamBatch:
    return StreamBatch(keys=view.keys, values=view.values, lengths=view.lengths,
                       positions=view.positions, acc_scores=view.scores,
                       num_kv_heads=num_kv_heads, layer=0, num_layers=1, scale=1.0)


def expected_after(view: StreamView, selection: Selection, num_kv_heads: int,
                   narrow_state: tuple[torch.Tensor, torch.Tensor] | None = None) -> StreamView:
    """The streams after compacting `view`; narrow_state: (the streams' key scales [N, D],
    their narrow slot counts [N]) when the selection narrows (settle_narrowing)."""
    if narrow_state is not None:
        selection, _ = settle_narrowing(selection, *narrow_state)
    out = apply_selection(batch_of(view, num_kv_heads), selection)
    return StreamView(out.keys, out.values, out.positions, out.acc_scores, out.lengths)


def expected_low_after(old: TierView, old_balance: torch.Tensor, view: StreamView,
                       selection: Selection, num_kv_heads: int) -> tuple[TierView, torch.Tensor]:
    """The low tier after compacting `view` with `selection`, and the streams' balancing
    (old_balance [N, D]: zeros = none fixed yet)."""
    balance = frozen_scales(old_balance, selection.key_scales)
    fmt = LowBitFormat(view.keys.shape[-1], TIER.key_bits, TIER.value_bits)
    return low_tier_after(old, batch_of(view, num_kv_heads), selection, TIER, fmt, balance), balance


def random_selection(view: StreamView, seed: int, keep_prob: float = 0.6,
                     kind: str = "evict") -> Selection:
    """A random Selection of `kind` (see KINDS) over `view`. Merges send evicted slots to a
    random slot of their stream (sometimes an evicted one, which apply_selection drops);
    demotions (to a TIER) pick random evicted slots; narrowing (to NARROW) the first kept
    slots of each stream, up to a random count, with random channels pruned."""
    gen = torch.Generator().manual_seed(seed)
    num_streams, max_len, head_dim = view.keys.shape
    live = torch.arange(max_len)[None, :] < view.lengths[:, None]
    keep = (torch.rand(num_streams, max_len, generator=gen) < keep_prob) & live
    selection = Selection(keep=keep)

    def random_slots(*shape):
        return torch.randint(-1, max(max_len, 1), shape, generator=gen)

    if kind in ("merge", "merge_unnormalized", "everything", "everything_narrow"):
        selection.merge_into = torch.where(keep, torch.arange(max_len),
                                           random_slots(num_streams, max_len))
        selection.weights = torch.rand(num_streams, max_len, generator=gen)
        selection.weights[torch.rand(num_streams, max_len, generator=gen) < 0.1] = 0.0
        selection.normalize_merges = kind != "merge_unnormalized"
    if kind in ("value_merge", "everything", "everything_narrow"):
        selection.value_merge_into = random_slots(num_streams, max_len, 2)
        selection.value_merge_weights = torch.rand(num_streams, max_len, 2, generator=gen)
    if kind in ("demote", "everything"):
        merged = (torch.zeros_like(keep) if selection.merge_into is None
                  else selection.merge_into >= 0)
        selection.demote = (torch.rand(num_streams, max_len, generator=gen) < 0.7) & ~keep & ~merged
        selection.demote_scores = torch.rand(num_streams, max_len, generator=gen)
        selection.second_tier = TIER
        selection.key_scales = 0.5 + torch.rand(num_streams, head_dim, generator=gen)
    if kind in ("narrow", "everything_narrow"):
        pruned = head_dim - NARROW.kept_channels(head_dim)
        order = torch.rand(num_streams, head_dim, generator=gen).argsort(dim=1)
        selection.key_scales = torch.ones(num_streams, head_dim).scatter(1, order[:, :pruned], 0.0)
        cutoff = torch.randint(0, max(max_len, 1) + 1, (num_streams, 1), generator=gen)
        selection.narrow = keep & (keep.cumsum(dim=1) <= cutoff)
        selection.second_tier = NARROW
    return selection
