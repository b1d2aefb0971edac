"""Chunk identity and the chunk store: spans, keys, the RAG prompt helper, the byte bound,
LRU order and compressed chunks."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_kvcompress.sharing.chunk_reuse import plan_reuse, select_recompute
from vllm_kvcompress.sharing.chunk_store import ChunkStore, StoredChunk
from vllm_kvcompress.sharing.chunks import chunk_key, rag_prompt, validate_chunks
from vllm_kvcompress.sharing.replacement import LRU, Marking


@pytest.mark.parametrize("value, fragment", [
    ("0-5", "must be"),
    ({"a": 1}, "must be"),
    ([0, 5, 7], "even length"),
    ([[0, 5, 7]], "bad span"),
    ([[0, 2.5]], "bad span"),
    ([[True, 3]], "bad span"),
    ([[3, 3]], "empty or outside"),
    ([[0, 11]], "empty or outside"),
    ([[-1, 4]], "empty or outside"),
    ([[4, 8], [6, 9]], "overlaps or precedes"),
    ([[5, 8], [0, 2]], "overlaps or precedes"),
])
def test_bad_chunks_are_rejected_by_name(value, fragment):
    with pytest.raises(ValueError, match="kv_chunks") as error:
        validate_chunks(value, prompt_len=10)
    assert fragment in str(error.value)


def test_good_chunks_flat_paired_or_json():
    for value in ([0, 4, 4, 10], [[0, 4], [4, 10]], "[0, 4, 4, 10]", "[[0, 4], [4, 10]]"):
        assert validate_chunks(value, 10) == [(0, 4), (4, 10)]
    assert validate_chunks([], 10) == []


def test_chunk_key_depends_on_tokens_and_model():
    assert chunk_key([1, 2, 3], "m") == chunk_key((1, 2, 3), "m")
    assert chunk_key([1, 2, 3], "m") != chunk_key([1, 2, 4], "m")
    assert chunk_key([1, 2, 3], "m") != chunk_key([1, 2, 3], "n")


def test_rag_prompt_passages_keep_their_tokens_anywhere(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    passages = ["Rivers run to the sea.", "The castle stands on a hill, old and grey.",
                "A library holds many books."]
    first = rag_prompt(tokenizer, passages, "Which is old?", "Read:\n{passages}\nQ: {question}")
    second = rag_prompt(tokenizer, passages[::-1], "Which is old?", "Read:\n{passages}\nQ: {question}")
    ids_a, ids_b = first["prompt"], second["prompt"]
    spans_a = validate_chunks(first["vllm_xargs"]["kv_chunks"], len(ids_a))
    spans_b = validate_chunks(second["vllm_xargs"]["kv_chunks"], len(ids_b))
    for i in range(3):
        (a0, a1), (b0, b1) = spans_a[i], spans_b[2 - i]
        assert ids_a[a0:a1] == ids_b[b0:b1] == tokenizer(passages[i], add_special_tokens=False).input_ids
    assert spans_a[1][0] != spans_b[1][0]           # the middle passage moved
    assert all(isinstance(x, int) for x in first["vllm_xargs"]["kv_chunks"])  # flat, as vLLM's schema wants
    with pytest.raises(ValueError, match="template"):
        rag_prompt(tokenizer, passages, "q", "no placeholders")


def chunk(n: int, layers: int = 2, heads: int = 2, dim: int = 4, seed: int = 0) -> StoredChunk:
    g = torch.Generator().manual_seed(seed)
    return StoredChunk(keys=torch.randn(layers, heads, n, dim, generator=g),
                       values=torch.randn(layers, heads, n, dim, generator=g),
                       offsets=torch.arange(n).expand(layers, heads, n).contiguous(),
                       outside=torch.rand(n, generator=g),
                       received=torch.rand(layers, heads, n, generator=g),
                       surprisal=torch.rand(n, generator=g) * 10)


def test_store_never_exceeds_its_bound_and_evicts_least_recent():
    rng = random.Random(0)
    store = ChunkStore(capacity_bytes=chunk(40).nbytes * 3)
    for step in range(200):
        key = str(rng.randrange(12))
        if store.get(key) is None:
            store.put(key, chunk(rng.randrange(5, 60), seed=step))
        assert store.bytes <= store.capacity_bytes
        assert store.bytes == sum(c.nbytes for c in store._chunks.values())
    assert store.hits > 0 and store.evictions > 0
    small = ChunkStore(capacity_bytes=chunk(10).nbytes * 2)
    small.put("a", chunk(10)), small.put("b", chunk(10))
    small.get("a")
    small.put("c", chunk(10))
    assert "a" in small and "c" in small and "b" not in small
    assert not small.put("huge", chunk(100)) and len(small) == 2


def test_store_follows_its_replacement_policy_and_hints_only_move_victims():
    hinted = ChunkStore(capacity_bytes=chunk(10).nbytes * 2, replacement=Marking(capacity=2))
    hinted.put("a", chunk(10)), hinted.put("b", chunk(10))
    hinted.get("b", discard=True)       # b's last use: it goes before the older a
    hinted.put("c", chunk(10))
    assert "a" in hinted and "c" in hinted and "b" not in hinted
    rng = random.Random(1)
    for policy in (LRU(), Marking(capacity=3)):
        store = ChunkStore(capacity_bytes=chunk(40).nbytes * 3, replacement=policy)
        for step in range(200):
            key, hint = str(rng.randrange(12)), rng.choice([None, True, False])
            if store.get(key, discard=hint) is None:
                store.put(key, chunk(rng.randrange(5, 60), seed=step), discard=hint)
            held = sum(c.nbytes for c in store._chunks.values())
            assert store.bytes == held <= store.capacity_bytes
            assert policy.num_evictable() == len(store)


def test_compressed_chunk_keeps_most_received_tokens_per_head():
    full = chunk(20)
    kept = full.compressed(0.25)
    assert kept.offsets.shape == (2, 2, 5) and kept.nbytes < full.nbytes
    for layer in range(2):
        for head in range(2):
            offsets = kept.offsets[layer, head]
            assert offsets[0] == 0                               # the chunk's first token
            best = full.received[layer, head, 1:].topk(4).indices + 1
            assert set(offsets[1:].tolist()) == set(best.tolist())
            torch.testing.assert_close(kept.keys[layer, head], full.keys[layer, head, offsets])
    again = kept.compressed(0.1)
    assert set(again.offsets.flatten().tolist()) <= set(kept.offsets.flatten().tolist())
    with pytest.raises(ValueError, match="kv_chunk_budget"):
        full.compressed(0)
    with pytest.raises(ValueError, match="kv_chunk_score.*attention, surprisal"):
        full.compressed(0.5, score="length")


def test_compressed_by_surprisal_keeps_the_same_unexpected_tokens_in_every_head():
    full = chunk(20)
    kept = full.compressed(0.25, score="surprisal")
    best = {0} | set((full.surprisal[1:].topk(4).indices + 1).tolist())
    for layer in range(2):
        for head in range(2):
            assert set(kept.offsets[layer, head].tolist()) == best
            torch.testing.assert_close(kept.values[layer, head],
                                       full.values[layer, head, kept.offsets[layer, head]])


def test_recompute_selection_and_plan():
    stored = chunk(20)
    picked = select_recompute(stored, 0.15, "attention")
    assert picked.tolist() == sorted(stored.outside.topk(3).indices.tolist())
    assert select_recompute(stored, 0.0, "random").numel() == 0
    with pytest.raises(ValueError, match="kv_chunk_recompute"):
        select_recompute(stored, 1.5, "attention")
    tokens = list(range(100, 160))
    store = ChunkStore(1 << 30)
    store.put(chunk_key(tokens[10:30], "m"), stored)
    plan = plan_reuse(tokens, [(10, 30), (40, 50)], store, "m", 0.15)
    assert [c.start for c in plan.loaded] == [10] and plan.missed[0][1:] == (40, 50)
    expected = sorted(set(range(60)) - set(range(10, 30)) | {10 + i for i in picked.tolist()})
    assert plan.computed.tolist() == expected and plan.reused_tokens == 17
    by_deviation = plan_reuse(tokens, [(10, 30)], store, "m", 0.15, "deviation",
                              deviation=lambda hits: [torch.arange(20.0) for _ in hits])
    assert by_deviation.loaded[0].recompute.tolist() == [17, 18, 19]
    with pytest.raises(ValueError, match="deviation"):
        select_recompute(stored, 0.15, "deviation")
