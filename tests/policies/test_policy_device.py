"""Policies run where their tensors live: on a GPU they give the CPU's selection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from policy_batches import (CASES, IDS, assert_same_selection, assert_same_streams, make_batch,
                            selection_rows)
from vllm_kvcompress.policies import apply_selection, make_policy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def to(batch, device):
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in moved.items()
                                         if isinstance(v, torch.Tensor)})


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_gpu_matches_cpu(name, options):
    cpu = make_batch([40, 35, 22, 29, 40, 40, 9, 17], num_kv_heads=2, key_bias=2.0, gaps=True)
    gpu = to(cpu, "cuda")
    policy = make_policy(name, window=6, **options)
    on_cpu, on_gpu = policy.compress(cpu, 16), policy.compress(gpu, 16)
    on_gpu_back = dataclasses.replace(on_gpu, **{
        f.name: getattr(on_gpu, f.name).cpu() for f in dataclasses.fields(on_gpu)
        if isinstance(getattr(on_gpu, f.name), torch.Tensor)})
    streams = range(cpu.num_streams)
    assert_same_selection(selection_rows(on_cpu, streams, cpu.max_len),
                          selection_rows(on_gpu_back, streams, cpu.max_len), cpu.live_mask())
    assert_same_streams(apply_selection(cpu, on_cpu), to(apply_selection(gpu, on_gpu), "cpu"))
