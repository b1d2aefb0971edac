"""Random Selections over gathered streams, and what compacting with them must give:
policies.apply.apply_selection (the padded definition) on the same streams."""

from __future__ import annotations

import torch

from vllm_kvcompress.cache import StreamView
from vllm_kvcompress.policies import apply_selection
from vllm_kvcompress.policies.base import Selection, StreamBatch

KINDS = ("evict", "merge", "merge_unnormalized", "value_merge", "low_precision", "prune",
         "everything")


def expected_after(view: StreamView, selection: Selection, num_kv_heads: int) -> StreamView:
    batch = StreamBatch(keys=view.keys, values=view.values, lengths=view.lengths,
                        positions=view.positions, acc_scores=view.scores,
                        num_kv_heads=num_kv_heads, layer=0, num_layers=1, scale=1.0)
    out = apply_selection(batch, selection)
    return StreamView(out.keys, out.values, out.positions, out.acc_scores, out.lengths)


def random_selection(view: StreamView, seed: int, keep_prob: float = 0.6,
                     kind: str = "evict") -> Selection:
    """A random Selection of `kind` (see KINDS) over `view`. Merges send evicted slots to a
    random slot of their stream (sometimes an evicted one, which apply_selection drops)."""
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
    if kind in ("low_precision", "everything"):
        selection.low_precision = torch.rand(num_streams, max_len, generator=gen) < 0.5
        selection.quant_bits = int(torch.randint(2, 9, (1,), generator=gen))
        selection.key_channel_scale = 0.5 + torch.rand(num_streams, head_dim, generator=gen)
    if kind in ("prune", "everything"):
        selection.key_channel_mask = torch.rand(num_streams, head_dim, generator=gen) < 0.7
        selection.key_pruned_slots = torch.rand(num_streams, max_len, generator=gen) < 0.8
    return selection
