"""Scoring helpers against plain per-stream, per-query-head computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policy_batches import make_batch, with_garbage_padding
from vllm_kvcompress.policies.scoring import (accumulate_attention, attention_probs,
                                              global_local_score, most_similar_kept, pool_scores,
                                              window_attention)


def naive_window_scores(batch, reduce):
    """One stream and one query head at a time, KV repeated per head, explicit causality."""
    out = torch.zeros(batch.num_streams, batch.max_len)
    for n in range(batch.num_streams):
        length = int(batch.lengths[n])
        keys, positions = batch.keys[n, :length], batch.positions[n, :length]
        per_head = []
        for g in range(batch.window_queries.shape[1]):
            total = torch.zeros(length)
            for w, position in enumerate(batch.window_positions[n].tolist()):
                if position < 0:
                    continue
                logits = keys @ batch.window_queries[n, g, w] * batch.scale
                logits[positions > position] = -torch.inf
                total += torch.softmax(logits, dim=0)
            per_head.append(total)
        stacked = torch.stack(per_head)
        out[n, :length] = stacked.mean(0) if reduce == "mean" else stacked.amax(0)
    return out


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_window_attention_matches_naive(reduce):
    data = make_batch([30, 12, 3, 25], num_kv_heads=2, group=3, window=6, gaps=True, seed=2)
    got = window_attention(data.window_queries, data.keys, data.lengths, data.positions,
                           data.window_positions, data.scale, reduce)
    torch.testing.assert_close(got, naive_window_scores(data, reduce))


def test_window_attention_ignores_padding_content():
    data = make_batch([30, 12, 3, 25], num_kv_heads=2, window=6, gaps=True)
    dirty = with_garbage_padding(data, extra=4)
    clean = window_attention(data.window_queries, data.keys, data.lengths, data.positions,
                             data.window_positions, data.scale)
    noisy = window_attention(dirty.window_queries, dirty.keys, dirty.lengths, dirty.positions,
                             dirty.window_positions, dirty.scale)
    torch.testing.assert_close(noisy[:, :30], clean)
    assert (noisy[:, 30:] == 0).all()


def test_window_attention_rejects_unknown_reduce():
    data = make_batch([5, 5])
    with pytest.raises(ValueError, match="reduce"):
        window_attention(data.window_queries, data.keys, data.lengths, data.positions,
                         data.window_positions, data.scale, "sum")


def test_causal_by_position_and_absent_queries():
    data = make_batch([6], num_kv_heads=1, group=1, window=2)
    data.window_positions = torch.tensor([[-1, 2]])
    probs = attention_probs(data.window_queries, data.keys, data.lengths, data.positions,
                            data.window_positions, data.scale)
    assert (probs[0, 0, 0] == 0).all()                       # absent query
    assert (probs[0, 0, 1, 3:] == 0).all()                   # keys after position 2
    torch.testing.assert_close(probs[0, 0, 1].sum(), torch.tensor(1.0))


def test_accumulate_attention_adds_decode_rows():
    data = make_batch([9, 7], num_kv_heads=2, group=2, window=1, seed=4)
    query = torch.randn(2, 2, 1, 16)
    position = data.positions.gather(1, (data.lengths - 1)[:, None])
    updated = accumulate_attention(data.acc_scores, query, data.keys, data.lengths, data.positions,
                                   position, data.scale)
    for n in range(2):
        length = int(data.lengths[n])
        rows = torch.softmax(query[n, :, 0] @ data.keys[n, :length].T * data.scale, dim=-1)
        torch.testing.assert_close(updated[n, :length], data.acc_scores[n, :length] + rows.sum(0))


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_pooling_equals_pooling_each_stream_alone(kind, kernel):
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 20, generator=gen)
    lengths = torch.tensor([20, 11, 2])
    dirty = scores.clone()
    dirty[torch.arange(20)[None, :] >= lengths[:, None]] = float("nan")
    got = pool_scores(dirty, lengths, kernel, kind)
    pool = F.avg_pool1d if kind == "avg" else F.max_pool1d
    for n, length in enumerate(lengths.tolist()):
        alone = pool(scores[n:n + 1, None, :length], kernel, stride=1, padding=kernel // 2)[0, 0]
        torch.testing.assert_close(got[n, :length], alone)
        assert (got[n, length:] == 0).all()
    with pytest.raises(ValueError, match="odd"):
        pool_scores(scores, lengths, 4, kind)


def test_global_local_score():
    glo = torch.tensor([[8.0, 2.0, 2.0, 0.0, 99.0]])
    loc = torch.tensor([[0.1, 0.1, 0.7, 0.1, 99.0]])
    got = global_local_score(glo, loc, torch.tensor([4]))
    # mean(glo) = 3, mean(loc) = 0.25: glo rescaled = [0.667, 0.167, 0.167, 0].
    torch.testing.assert_close(got, torch.tensor([[8 / 12, 2 / 12, 0.7, 0.1, 0.0]]))
    untracked = global_local_score(torch.zeros(1, 5), loc, torch.tensor([4]))
    torch.testing.assert_close(untracked[0, :4], loc[0, :4])


def test_most_similar_kept_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 12, 8, generator=gen)
    keep = torch.rand(3, 12, generator=gen) < 0.4
    keep[2] = False
    index, cosine = most_similar_kept(keys, keep)
    for n in range(2):
        centres = keep[n].nonzero().squeeze(1)
        sims = F.cosine_similarity(keys[n][:, None], keys[n][centres][None], dim=-1)
        best, which = sims.max(dim=1)
        assert torch.equal(index[n], centres[which])
        torch.testing.assert_close(cosine[n], best)
    assert (index[2] == -1).all() and (cosine[2] == -torch.inf).all()
