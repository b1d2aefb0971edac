"""Chunk reuse on the bundled model: RoPE re-rotation is exact, recomputing everything or
reusing nothing gives stock outputs, and reused chunks answer from the store."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.eval.chunk_reuse_runner import FULL_RECOMPUTE, ChunkReuseRunner, ReuseSetting
from vllm_kvcompress.scorers.rope import rotate
from vllm_kvcompress.sharing.chunk_store import ChunkStore
from vllm_kvcompress.sharing.chunks import chunk_key, rag_prompt, validate_chunks

PASSAGES = [
    "The castle stands on a hill. One of the special magic numbers for quiet-lantern is: 4821937.",
    "Rivers run to the sea. One of the special magic numbers for brave-otter is: 7712093.",
    "A library holds many books. One of the special magic numbers for calm-river is: 3390021.",
]
QUESTION = ("What is the special magic number for brave-otter mentioned in the provided text? "
            "The special magic number for brave-otter mentioned in the provided text is")
TEMPLATE = "Remember the numbers in these passages.\n\n{passages}\n\n{question}"


@pytest.fixture(scope="module")
def runner(model_dir):
    return ChunkReuseRunner(model_dir)


def prompts(runner, filler: int = 0):
    """The passages in two orders; the second after `filler` more sentences."""
    first = rag_prompt(runner.tokenizer, PASSAGES, QUESTION, TEMPLATE)
    second = rag_prompt(runner.tokenizer, [PASSAGES[2], PASSAGES[0], PASSAGES[1]], QUESTION,
                        "The grass is green. " * filler + TEMPLATE)
    return [(p["prompt"], validate_chunks(p["vllm_xargs"]["kv_chunks"], len(p["prompt"])))
            for p in (first, second)]


def layer_keys(runner, token_ids, start):
    """Every layer's keys [L, H, n, D] of token_ids computed alone at positions start.."""
    cache = runner._empty_cache()
    runner._forward(cache, torch.tensor(token_ids), torch.arange(start, start + len(token_ids)))
    return torch.stack([layer.keys for layer in cache.layers])


@pytest.mark.parametrize("shift", [37, 1500])
def test_rerotated_keys_equal_keys_computed_there(runner, shift):
    tokens = runner.tokenizer(PASSAGES[0], add_special_tokens=False).input_ids
    at_zero, there = layer_keys(runner, tokens, 0), layer_keys(runner, tokens, shift)
    moved = rotate(at_zero.permute(2, 0, 1, 3), torch.full((len(tokens),), shift),
                   runner.shape.rope_theta).permute(1, 2, 0, 3)
    # float32 angles: an error of ~1e-7 rad per position unit, times |k| up to ~20
    torch.testing.assert_close(moved, there, rtol=1e-4, atol=max(1e-4, 5e-7 * shift))
    assert (at_zero - there).abs().max() > 0.1      # without the rotation they differ


def test_no_reuse_and_full_recompute_match_stock(runner, model_dir):
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    (first, first_spans), (second, second_spans) = prompts(runner)
    expected = stock.generate(torch.tensor([second]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None)[0, len(second):].tolist()
    empty = ChunkStore(1 << 30)
    nothing_cached = runner.answer(second, second_spans, ReuseSetting("r0", recompute=0.0),
                                   empty, 12)
    assert nothing_cached.token_ids == expected[:len(nothing_cached.token_ids)]
    assert nothing_cached.computed == len(second) and len(empty) == 3
    store = ChunkStore(1 << 30)
    runner.answer(first, first_spans, FULL_RECOMPUTE, store, 12)
    assert len(store) == 0                                      # full recompute stores nothing
    runner.answer(first, first_spans, ReuseSetting("r100", recompute=1.0), store, 12)
    everything = runner.answer(second, second_spans, ReuseSetting("r100", recompute=1.0), store, 12)
    assert store.hits == 3 and everything.computed == len(second) and everything.reused == 0
    assert everything.token_ids == nothing_cached.token_ids


def test_reuse_loads_chunks_and_the_rotation_matters(runner):
    """The passages move ~600 tokens; loaded unrotated they mislead the model far more."""
    (first, first_spans), (second, second_spans) = prompts(runner, filler=100)
    full = runner.answer(second, second_spans, FULL_RECOMPUTE, None, 12)
    divergence = {}
    for setting in (ReuseSetting("fixed", recompute=0.15),
                    ReuseSetting("unfixed", recompute=0.15, fix_rope=False),
                    ReuseSetting("deviation", recompute=0.15, selection="deviation")):
        store = ChunkStore(1 << 30)
        runner.answer(first, first_spans, setting, store, 12)
        outcome = runner.answer(second, second_spans, setting, store, 12)
        recomputed = sum(int(0.15 * (end - start) + 0.5) for start, end in second_spans)
        assert outcome.reused == sum(end - start for start, end in second_spans) - recomputed
        assert outcome.computed == len(second) - outcome.reused
        divergence[setting.label] = torch.nn.functional.kl_div(
            outcome.first_logits.log_softmax(-1), full.first_logits.log_softmax(-1),
            log_target=True, reduction="sum").item()
        if setting.fix_rope:
            assert "7712093" in outcome.text
    assert divergence["fixed"] * 5 < divergence["unfixed"]
    assert divergence["deviation"] * 5 < divergence["unfixed"]


def test_saved_chunks_carry_the_models_surprisal(runner, model_dir):
    """A chunk computed in full is stored with -log p of each of its tokens given the prompt
    before it: what a stock forward's logits say."""
    from transformers import AutoModelForCausalLM

    (first, first_spans), _ = prompts(runner)
    store = ChunkStore(1 << 30)
    runner.answer(first, first_spans, ReuseSetting("r"), store, 1)
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = stock(torch.tensor([first])).logits[0].float()
    nll = -logits.log_softmax(-1)[:-1].gather(1, torch.tensor(first[1:])[:, None])[:, 0]
    for start, end in first_spans:
        stored = store.get(chunk_key(first[start:end], runner.model_name))
        torch.testing.assert_close(stored.surprisal, nll[start - 1:end - 1], rtol=1e-3, atol=1e-3)
