"""write_slots: rows land where the slot ids say; Triton equals the reference."""

from __future__ import annotations

import pytest
import torch

from random_streams import DEVICE
from vllm_kvcompress.kernels import write_slots


def _pools(num_blocks=12, block_size=8, head_dim=20, dtype=torch.float32, device="cpu"):
    kv = torch.zeros(num_blocks, 2, block_size, head_dim, dtype=dtype, device=device)
    return (kv[:, 0], kv[:, 1],
            torch.full((num_blocks, block_size), -1, dtype=torch.int32, device=device),
            torch.full((num_blocks, block_size), 7.0, device=device))


def _rows(count, head_dim=20, device="cpu"):
    gen = torch.Generator().manual_seed(count)
    slot_ids = torch.randperm(12 * 8, generator=gen)[:count]
    return (slot_ids.to(device), torch.randn(count, head_dim, generator=gen).to(device),
            torch.randn(count, head_dim, generator=gen).to(device),
            torch.randint(0, 1000, (count,), generator=gen).to(device),
            torch.rand(count, generator=gen).to(device))


@pytest.mark.parametrize("with_scores", [True, False])
def test_reference_writes_each_row_to_its_slot(with_scores):
    key_pool, value_pool, positions, scores = _pools()
    slot_ids, keys, values, pos, init = _rows(30)
    write_slots(key_pool, value_pool, positions, scores, slot_ids, keys, values, pos,
                init if with_scores else None, impl="torch")
    for i, slot in enumerate(slot_ids.tolist()):
        block, offset = divmod(slot, 8)
        assert torch.equal(key_pool[block, offset], keys[i])
        assert torch.equal(value_pool[block, offset], values[i])
        assert positions[block, offset] == pos[i]
        assert scores[block, offset] == (init[i] if with_scores else 0.0)
    untouched = torch.ones(12 * 8, dtype=torch.bool)
    untouched[slot_ids] = False
    assert (positions.view(-1)[untouched] == -1).all()
    assert (scores.view(-1)[untouched] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_scores", [True, False])
def test_triton_equals_reference(dtype, with_scores):
    slot_ids, keys, values, pos, init = _rows(37, device=DEVICE)
    results = []
    for impl in ("torch", "triton"):
        _, values_pool, positions, scores = _pools(dtype=dtype, device=DEVICE)
        # Keys stored transposed in each block, as vLLM's CPU attention wants them.
        keys_pool = torch.zeros(12, 20, 8, dtype=dtype, device=DEVICE).transpose(1, 2)
        write_slots(keys_pool, values_pool, positions, scores, slot_ids, keys, values, pos,
                    init if with_scores else None, impl=impl)
        results.append((keys_pool, values_pool, positions, scores))
    for want, got in zip(*results):
        assert torch.equal(want, got)
