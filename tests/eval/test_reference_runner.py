"""The reference runner: exact against transformers at full KV, signals as StreamBatch
defines them, compression at the schedule's moments, kept positions exposed."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.eval.reference_runner import ActivePolicy
from vllm_kvcompress.eval.settings import Setting
from vllm_kvcompress.kernels.window_scores import window_attention_scores_reference

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
MAX_TOKENS = 16
STORY = ("Alice keeps her garden tidy. Every morning she waters the roses, feeds the cat and "
         "writes one line in her diary. Her neighbour Bob fixes bicycles and sings loudly. ")


@pytest.fixture(scope="module")
def transformers_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def transformers_greedy(model, token_ids, max_new_tokens):
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, len(token_ids):].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_full_kv_equals_transformers_greedy(runner, transformers_model, prompt):
    token_ids = runner.tokenizer(prompt).input_ids
    generation = runner.generate(runner.prefill(token_ids), MAX_TOKENS)
    assert generation.token_ids == transformers_greedy(transformers_model, token_ids, MAX_TOKENS)


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_budget_above_context_never_compresses_and_equals_full_kv(runner, policy):
    token_ids = runner.tokenizer(STORY * 2).input_ids
    active = ActivePolicy.from_setting(Setting(policy, budget=len(token_ids) + MAX_TOKENS))
    prefilled = runner.prefill(token_ids, active.window)
    compressed = runner.generate(prefilled, MAX_TOKENS, active)
    assert compressed.state.compressions == []
    assert compressed.token_ids == runner.generate(prefilled, MAX_TOKENS).token_ids


def test_prefill_signals_match_transformers_attention(runner, transformers_model):
    token_ids = runner.tokenizer(STORY).input_ids
    window = 8
    state = runner.prefill(token_ids, window)
    with torch.inference_mode():
        attentions = transformers_model(torch.tensor([token_ids]), output_attentions=True).attentions
    heads, group, length = runner.num_kv_heads, runner.group, len(token_ids)
    for layer, probs in zip(state.layers, attentions):
        probs = probs[0].view(heads, group, length, length)          # [H, G, queries, keys]
        # Accumulated attention: every query, summed over the group's query heads.
        torch.testing.assert_close(layer.acc_scores[:, :length], probs.sum(dim=(1, 2)),
                                   atol=1e-4, rtol=1e-4)
        # The window queries reproduce the last `window` rows of attention.
        assert layer.window_positions.tolist() == list(range(length - window, length))
        scores = window_attention_scores_reference(
            layer.window_queries, layer.keys[:, :length], layer.lengths,
            layer.positions[:, :length], layer.window_positions.expand(heads, -1), runner.scale)
        torch.testing.assert_close(scores, probs[:, :, -window:].sum(dim=(1, 2)),
                                   atol=1e-4, rtol=1e-4)
    assert all(layer.positions[:, :length].tolist() == [list(range(length))] * heads
               for layer in state.layers)


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "streaming"])
def test_compresses_at_the_schedule_moments_and_exposes_kept_positions(runner, policy):
    budget, interval, new_tokens = 48, 8, 20
    token_ids = runner.tokenizer(STORY * 2).input_ids
    setting = Setting(policy, budget=budget, interval=interval)
    active = ActivePolicy.from_setting(setting)
    prefilled = runner.prefill(token_ids, active.window)
    generation = runner.generate(prefilled, new_tokens, active)
    steps = len(generation.token_ids) - 1                # the last token is never fed back

    schedule = CompressionSchedule(budget, interval, block_size=16)
    expected, last = [], 0
    for num_tokens in range(len(token_ids), len(token_ids) + steps + 1):
        if schedule.should_compress(num_tokens, last, len(token_ids)):
            expected.append(last := num_tokens)
    assert [record.num_tokens for record in generation.state.compressions] == expected

    for record in generation.state.compressions:
        assert len(record.kept) == runner.num_layers
        for heads in record.kept:
            assert len(heads) == runner.num_kv_heads
            kept_mean = sum(len(positions) for positions in heads) / len(heads)
            assert kept_mean <= budget
            for positions in heads:
                assert positions.tolist() == sorted(set(positions.tolist()))
                assert int(positions.max()) == record.num_tokens - 1  # the newest token stays
    # Tokens decoded after the last compression sit at their original positions.
    final = generation.state.kept_positions()
    newest = list(range(expected[-1], len(token_ids) + steps))
    assert all(positions.tolist()[-len(newest):] == newest for heads in final for positions in heads)
    # The fork left the prefilled state whole.
    assert all(layer.lengths.tolist() == [len(token_ids)] * runner.num_kv_heads
               for layer in prefilled.layers)


def test_teacher_forcing_at_full_kv_scores_the_greedy_tokens(runner):
    token_ids = runner.tokenizer(PROMPTS[0]).input_ids
    prefilled = runner.prefill(token_ids)
    generation = runner.generate(prefilled, 8)
    forced = runner.teacher_force(prefilled, generation.token_ids)
    assert forced.argmax.tolist() == generation.token_ids
    assert bool((forced.nll >= 0).all())
