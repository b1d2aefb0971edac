"""The rewrite a Selection asks of its survivors beyond class merges, applied to the
gathered survivor buffer before it is scattered back: value-only merges (CaM), step 2 of
policies.apply's `apply_selection`, with the same arithmetic (float32, cast back to the
pool's dtype). Key-channel pruning (ThinK) is the narrow-key tier's (narrow_tier.py).
These policies are rare and the buffer is small, so plain torch ops (any device) suffice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from vllm_kvcompress.cache.pools import LayerPools
from vllm_kvcompress.kernels import GatheredSlots
from vllm_kvcompress.policies.selection import Selection

if TYPE_CHECKING:
    from vllm_kvcompress.cache.compaction import CompactionPlan


def rewrite_survivors(survivors: GatheredSlots, pools: LayerPools, selection: Selection,
                      plan: CompactionPlan) -> GatheredSlots:
    """The survivors [M, D] after value merges; unchanged when the Selection has none."""
    if selection.value_merge_into is None:
        return survivors
    return replace(survivors, values=_value_merges(survivors.values, pools, selection, plan))


def _value_merges(values: torch.Tensor, pools: LayerPools, selection: Selection,
                  plan: CompactionPlan) -> torch.Tensor:
    """v_j += sum w * v_i over entries (i, m) targeting kept slot j; v_i read from the pool
    (before any merge), entries naming a slot that is not kept ignored."""
    targets = selection.value_merge_into                                         # [N, T, F]
    num_streams, max_len, fan = targets.shape
    flat = targets.reshape(num_streams, max_len * fan)
    valid = ((plan.live[..., None] & (targets >= 0) & (targets < max_len))
             .reshape(num_streams, -1) & plan.keep.gather(1, flat.clamp(0, max_len - 1)))
    entries = valid.flatten().nonzero().squeeze(1)                               # host sync
    source = plan.src_all.flatten()[entries // fan]
    row = plan.survivor_of.gather(1, flat.clamp(0, max_len - 1)).flatten()[entries]
    weights = selection.value_merge_weights.reshape(-1)[entries].float()
    block_size = pools.values.shape[1]
    source_values = pools.values[source // block_size, source % block_size].float()
    added = torch.zeros(values.shape, device=values.device).index_add_(
        0, row, weights[:, None] * source_values)
    received = torch.zeros(len(values), dtype=torch.bool, device=values.device)
    received[row] = True
    return torch.where(received[:, None], (values.float() + added).to(values.dtype), values)
