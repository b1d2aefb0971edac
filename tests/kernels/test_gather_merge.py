"""gather_merge_slots: plain gathers copy exactly; merges are weighted means per class."""

from __future__ import annotations

import pytest
import torch

from random_streams import DEVICE
from vllm_kvcompress.kernels import SlotMerge, gather_merge_slots

NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM = 10, 8, 12


def _pools(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, HEAD_DIM, generator=gen).to(dtype).to(device)
    return (kv, torch.randint(0, 500, (NUM_BLOCKS, BLOCK_SIZE), generator=gen,
                          dtype=torch.int32).to(device),
            torch.rand(NUM_BLOCKS, BLOCK_SIZE, generator=gen).to(device))


def _classes(num_outputs, normalize=True, device="cpu"):
    """Random disjoint classes over the pool: every output gets a centre, about half of
    them get 1..3 further members (one class has zero total weight)."""
    gen = torch.Generator().manual_seed(num_outputs)
    order = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)
    centres = order[:num_outputs]
    rest = order[num_outputs:].tolist()
    rows, members, offsets = [], [], [0]
    for row, centre in enumerate(centres.tolist()):
        if torch.rand(1, generator=gen) < 0.5:
            continue
        rows.append(row)
        extra = int(torch.randint(1, 4, (1,), generator=gen))
        members += [centre] + [rest.pop() for _ in range(extra)]
        offsets.append(len(members))
    weights = torch.rand(len(members), generator=gen)
    weights[offsets[0]:offsets[1]] = 0.0
    merge = SlotMerge(torch.tensor(rows).to(device), torch.tensor(members).to(device),
                      weights.to(device), torch.tensor(offsets).to(device), normalize)
    return centres.to(device), merge


def test_plain_gather_copies_exactly():
    kv, positions, scores = _pools(torch.float16)
    src = torch.tensor([5, 0, 79, 33])
    got = gather_merge_slots(kv[:, 0], kv[:, 1], positions, scores, src, impl="torch")
    block, offset = src // BLOCK_SIZE, src % BLOCK_SIZE
    assert torch.equal(got.keys, kv[block, 0, offset])
    assert torch.equal(got.values, kv[block, 1, offset])
    assert torch.equal(got.positions, positions[block, offset])
    assert torch.equal(got.scores, scores[block, offset])


@pytest.mark.parametrize("normalize", [True, False])
def test_merge_equals_plain_math(normalize):
    kv, positions, scores = _pools()
    centres, merge = _classes(12, normalize)
    got = gather_merge_slots(kv[:, 0], kv[:, 1], positions, scores, centres, merge,
                             impl="torch")
    flat_kv = kv.permute(0, 2, 1, 3).reshape(-1, 2, HEAD_DIM).double()
    offsets = merge.offsets.tolist()
    merged_rows = dict(zip(merge.rows.tolist(), range(len(merge.rows))))
    for row, centre in enumerate(centres.tolist()):
        assert got.positions[row] == positions.view(-1)[centre]
        if row not in merged_rows:
            assert torch.equal(got.keys[row].double(), flat_kv[centre, 0])
            assert got.scores[row] == scores.view(-1)[centre]
            continue
        g = merged_rows[row]
        members = merge.member_slots[offsets[g]:offsets[g + 1]]
        w = merge.member_weights[offsets[g]:offsets[g + 1]].double()
        want = (w[:, None, None] * flat_kv[members]).sum(0)
        if normalize:
            want = want / w.sum() if w.sum() > 0 else flat_kv[centre]
        torch.testing.assert_close(got.keys[row].double(), want[0])
        torch.testing.assert_close(got.values[row].double(), want[1])
        torch.testing.assert_close(got.scores[row], scores.view(-1)[members].sum())


@pytest.mark.parametrize("merged,normalize", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_equals_reference(merged, normalize, dtype):
    kv, positions, scores = _pools(dtype, DEVICE)
    centres, merge = _classes(21, normalize, DEVICE)
    # Keys stored transposed in each block, as vLLM's CPU attention wants them.
    keys = kv[:, 0].transpose(1, 2).contiguous().transpose(1, 2)
    results = [gather_merge_slots(keys, kv[:, 1], positions, scores, centres,
                                  merge if merged else None, impl=impl)
               for impl in ("torch", "triton")]
    # Merged rows are cast from float32: one bf16 ulp of rounding difference is allowed.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for want, got in zip(*(vars(r).values() for r in results)):
        assert want.dtype == got.dtype
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
