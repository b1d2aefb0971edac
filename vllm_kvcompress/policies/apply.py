"""apply_selection: the padded, executable definition of what a Selection does.

The paged cache's compaction (cache/compaction.py) must give the same streams; this
version is its test oracle and what the reference runner uses outside vLLM.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch, slot_indices


def apply_selection(batch: StreamBatch, selection: Selection, max_len: int | None = None) -> StreamBatch:
    """The compacted batch: each stream keeps its kept slots, in original order.

    In order (all per stream, slots of other streams never touched):
    1. Class merges: a kept centre c with members (merge_into[i] == c, i live, not kept)
       gets key and value sum_i w_i x_i / sum_i w_i over its class (centre included;
       without the division when normalize_merges is False; unchanged if the weights sum
       to 0) and acc_score sum_i acc_i. Members pointing to a non-kept slot are dropped.
    2. Value-only merges (CaM): v_j += sum w * v_i over the entries targeting kept slot j,
       v_i taken before step 1.
    3. Channel pruning (ThinK): on kept `narrow` slots, key channels whose key_scales are 0
       are zeroed (the narrow-key tier reads them back so).
    4. Compaction: kept slots to the front in slot order; new lengths = kept counts;
       padding: zeros, position -1, acc 0.
    Arithmetic of steps 1-2 runs in float32 and is cast back to the batch's dtype; slots
    no step rewrites are copied bit for bit. Window fields, layer_densities and the layer
    metadata pass through unchanged. Demoted slots (`demoted`) leave the batch: the
    low-bit tier that stores them is the caller's. A narrow slot whose stream already has
    its scales fixed is the caller's to exclude (Selection.narrow).

    max_len: padded length of the result (>= the largest kept count); None = the largest
    kept count, which costs one host sync.
    """
    live = batch.live_mask()
    keep = selection.keep & live
    keys, values, acc = batch.keys, batch.values, batch.acc_scores
    if selection.merge_into is not None:
        keys, values, acc = _class_merges(batch, selection, keep, live)
    if selection.value_merge_into is not None:
        values = _value_merges(batch, selection, keep, live, values)
    if selection.narrow is not None:
        pruned = (keep & selection.narrow)[..., None] & (selection.key_scales == 0)[:, None, :]
        keys = keys.masked_fill(pruned, 0)
    return _compact(batch, keep, keys, values, acc, max_len)


def _class_merges(batch: StreamBatch, selection: Selection, keep: torch.Tensor,
                  live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_streams, max_len = keep.shape
    slots = slot_indices(batch).expand(num_streams, max_len)
    target = torch.where(keep, slots, selection.merge_into)
    valid = live & (target >= 0) & (target < max_len) & keep.gather(1, target.clamp(min=0, max=max_len - 1))
    # Members of no class go to a spare column max_len, cut off afterwards.
    target = torch.where(valid, target, max_len)
    weights = torch.ones_like(batch.acc_scores, dtype=torch.float32) if selection.weights is None \
        else selection.weights.float()
    weights = torch.where(valid, weights, 0.0)
    member = (valid & ~keep).float()
    has_members = _scatter_sum(target, member, max_len) > 0

    def merged(x: torch.Tensor) -> torch.Tensor:
        weighted = torch.where(valid[..., None], weights[..., None] * x.float(), 0.0)
        total = _scatter_sum(target, weighted, max_len)
        if selection.normalize_merges:
            norm = _scatter_sum(target, weights, max_len)[..., None]
            total = torch.where(norm > 0, total / torch.where(norm > 0, norm, 1.0), x.float())
        return torch.where(has_members[..., None], total.to(x.dtype), x)

    acc_sum = _scatter_sum(target, torch.where(valid, batch.acc_scores.float(), 0.0), max_len)
    acc = torch.where(has_members, acc_sum.to(batch.acc_scores.dtype), batch.acc_scores)
    return merged(batch.keys), merged(batch.values), acc


def _value_merges(batch: StreamBatch, selection: Selection, keep: torch.Tensor,
                  live: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    num_streams, max_len = keep.shape
    targets = selection.value_merge_into                                           # [N, T, M]
    fan = targets.shape[2]
    flat = targets.reshape(num_streams, max_len * fan)
    valid = (live[..., None] & (targets >= 0) & (targets < max_len)).reshape(num_streams, -1) \
        & keep.gather(1, flat.clamp(min=0, max=max_len - 1))
    flat = torch.where(valid, flat, max_len)
    weights = torch.where(valid, selection.value_merge_weights.reshape(num_streams, -1).float(), 0.0)
    sources = batch.values.float().repeat_interleave(fan, dim=1)                  # [N, T*M, D]
    added = _scatter_sum(flat, torch.where(valid[..., None], weights[..., None] * sources, 0.0), max_len)
    received = _scatter_sum(flat, valid.float(), max_len) > 0
    return torch.where(received[..., None], (values.float() + added).to(values.dtype), values)


def demoted(batch: StreamBatch, selection: Selection) -> torch.Tensor:
    """[N, T] bool: the live slots `selection` moves to the low-bit tier (never kept ones)."""
    if selection.demote is None:
        return torch.zeros_like(selection.keep)
    return selection.demote & batch.live_mask() & ~selection.keep


def _compact(batch: StreamBatch, keep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             acc: torch.Tensor, max_len: int | None) -> StreamBatch:
    counts = keep.sum(dim=1)
    out_len = (int(counts.max()) if batch.num_streams else 0) if max_len is None else max_len
    width = min(out_len, batch.max_len)
    # Kept slots first, each group in slot order (stable sort of "not kept").
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
    present = torch.arange(out_len, device=keep.device)[None, :] < counts[:, None]

    def take(x: torch.Tensor, fill: float) -> torch.Tensor:
        index = order if x.dim() == 2 else order[..., None].expand(-1, -1, x.shape[-1])
        gathered = x.gather(1, index)
        if out_len > width:
            pad = list(gathered.shape)
            pad[1] = out_len - width
            gathered = torch.cat([gathered, gathered.new_full(pad, fill)], dim=1)
        mask = present if x.dim() == 2 else present[..., None]
        return torch.where(mask, gathered, torch.full_like(gathered, fill))

    return StreamBatch(
        keys=take(keys, 0.0), values=take(values, 0.0), lengths=counts,
        positions=take(batch.positions, -1), acc_scores=take(acc, 0.0),
        num_kv_heads=batch.num_kv_heads, layer=batch.layer, num_layers=batch.num_layers,
        scale=batch.scale, window_queries=batch.window_queries,
        window_positions=batch.window_positions, layer_densities=batch.layer_densities)


def _scatter_sum(index: torch.Tensor, source: torch.Tensor, width: int) -> torch.Tensor:
    """Sum `source` [N, S(, D)] into columns index [N, S] (values 0..width); returns the
    first `width` columns. float32."""
    shape = (source.shape[0], width + 1) + tuple(source.shape[2:])
    out = torch.zeros(shape, dtype=torch.float32, device=source.device)
    full_index = index if source.dim() == 2 else index[..., None].expand_as(source)
    return out.scatter_add_(1, full_index, source.float())[:, :width]
