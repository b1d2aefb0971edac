"""The host-sync counter sees what would make a GPU step wait, and nothing else."""

from __future__ import annotations

import torch

from vllm_kvcompress.cache.host_syncs import VALUE_READS, HostSyncCounter


def test_counts_value_reads_and_data_dependent_shapes():
    with torch.inference_mode():       # vLLM's forward: item() skips the dispatcher there
        y = torch.arange(6)
        with HostSyncCounter() as syncs:
            int(y.sum()), bool((y > 2).any()), float(y.max()), y.max().item()
            y.nonzero()
            y[y > 2]
            torch.repeat_interleave(y, y)
    assert syncs.by_kind == {"item": 4, "nonzero": 1, "boolean mask": 1, "repeat_interleave": 1}
    assert syncs.total == sum(syncs.sites.values()) == 7


def test_ignores_sized_ops_and_restores_tensor_methods():
    before = {name: getattr(torch.Tensor, name) for name in VALUE_READS}
    x = torch.arange(6)
    with HostSyncCounter() as syncs:
        torch.repeat_interleave(x, x, output_size=15)
        x[torch.tensor([1, 2])] = 0
        x.gather(0, torch.tensor([3]))
        x.tolist()       # a copy to the host: not seen on CPU (the module says why)
    assert syncs.total == 0, syncs.by_kind
    assert {name: getattr(torch.Tensor, name) for name in VALUE_READS} == before
