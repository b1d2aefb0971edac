"""Observation-window scores: reference vs plain math, Triton vs reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from random_streams import DEVICE
from vllm_kvcompress.kernels import window_attention_scores
from vllm_kvcompress.policies.scoring import window_attention


def random_window_batch(seed, num_streams, group, window, max_len, head_dim,
                        dtype=torch.float32, device="cpu"):
    """Padded streams whose positions have gaps (as after compression) and windows whose
    oldest queries may be absent (-1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_streams,), generator=gen)
    gaps = torch.randint(1, 4, (num_streams, max_len), generator=gen)
    key_positions = gaps.cumsum(1) - 1
    last = key_positions.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    # Window queries end at the stream's last position; the oldest ones may be absent.
    query_positions = last[:, None] - torch.arange(window - 1, -1, -1)[None, :] * 2
    absent = torch.randint(0, window + 1, (num_streams,), generator=gen)
    query_positions[torch.arange(window)[None, :] < absent[:, None]] = -1
    key_positions[torch.arange(max_len)[None, :] >= lengths[:, None]] = -1
    return dict(
        window_queries=torch.randn(num_streams, group, window, head_dim,
                                   generator=gen).to(dtype).to(device),
        keys=torch.randn(num_streams, max_len, head_dim, generator=gen).to(dtype).to(device),
        lengths=lengths.to(device), key_positions=key_positions.to(device),
        query_positions=query_positions.to(device), scale=head_dim ** -0.5)


def plain_window_scores(window_queries, keys, lengths, key_positions, query_positions, scale):
    scores = torch.zeros(keys.shape[:2], dtype=torch.float64)
    for n in range(keys.shape[0]):
        live_keys = keys[n, :lengths[n]].double().cpu()
        live_pos = key_positions[n, :lengths[n]].cpu()
        for g in range(window_queries.shape[1]):
            for w, q_pos in enumerate(query_positions[n].tolist()):
                visible = live_pos <= q_pos
                if q_pos < 0 or not visible.any():
                    continue
                logits = live_keys[visible] @ window_queries[n, g, w].double().cpu() * scale
                scores[n, :lengths[n]][visible] += torch.softmax(logits, 0)
    return scores


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(1, 3), st.integers(1, 6),
       st.integers(1, 20))
def test_reference_equals_plain_math(seed, num_streams, group, window, max_len):
    batch = random_window_batch(seed, num_streams, group, window, max_len, 8)
    got = window_attention_scores(**batch, impl="torch")
    torch.testing.assert_close(got.double(), plain_window_scores(**batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 2, 4, 40, 16), (2, 4, 20, 70, 24), (1, 1, 1, 5, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_equals_reference(shape, dtype):
    batch = random_window_batch(7, *shape, dtype=dtype, device=DEVICE)
    want = window_attention_scores(**batch, impl="torch")
    got = window_attention_scores(**batch, impl="triton")
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_equals_reference_on_gpu_at_scale():
    batch = random_window_batch(8, 32, 4, 32, 4000, 128, dtype=torch.bfloat16, device="cuda")
    want = window_attention_scores(**batch, impl="torch")
    got = window_attention_scores(**batch, impl="triton")
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_sum_over_heads_is_g_times_the_policies_mean():
    batch = random_window_batch(9, 3, 4, 5, 30, 8)
    mean = window_attention(**batch, reduce="mean")
    torch.testing.assert_close(window_attention_scores(**batch, impl="torch"), 4 * mean)
