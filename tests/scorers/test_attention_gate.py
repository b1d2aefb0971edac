"""The attention gate: a token's score depends on the tokens before it in its request, not
on how the request is split into steps, nor on other requests of a step, nor on position;
its weights round-trip."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from vllm_kvcompress.scorers.attention_gate import AttentionGates
from vllm_kvcompress.scorers.rope import rotate
from vllm_kvcompress.scorers.trained_scorer import ModelShape
from vllm_kvcompress.scorers.weights import load_scorer

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     hidden_size=64, head_dim=16, vocab_size=100, rope_theta=10000.0)


def _gate(seed: int = 0) -> AttentionGates:
    torch.manual_seed(seed)
    gate = AttentionGates(ModelShape.of_config(CONFIG), hidden=8)
    gate.in_scale.uniform_(0.5, 2.0)
    return gate


def _tokens(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, 2, 2, 16, generator=generator),
            torch.randn(count, 2, 16, generator=generator),
            torch.randn(count, 2, 16, generator=generator))


def test_a_step_of_several_requests_scores_each_as_if_alone():
    gate = _gate()
    requests = [_tokens(n, seed) for seed, n in enumerate((7, 1, 5, 1))]
    alone = [gate.score(1, q, k, v, torch.arange(len(k))) for q, k, v in requests]
    q, k, v = (torch.cat(parts) for parts in zip(*requests))
    positions = torch.cat([torch.arange(len(r[1])) for r in requests])
    segments = torch.tensor([0, 7, 8, 13, 14])
    together = gate.score(1, q, k, v, positions, segments=segments)
    torch.testing.assert_close(together, torch.cat(alone))
    # The context matters: a token with other tokens before it scores differently.
    assert not torch.equal(gate.score(1, q, k, v, positions)[7:], torch.cat(alone[1:]))


def test_steps_carry_the_context_so_splitting_changes_nothing():
    gate = _gate(4)
    q, k, v = _tokens(300, seed=5)  # longer than one block of the linear attention
    whole = gate.score(1, q, k, v, torch.arange(300))
    state = gate.new_state(1, 2)
    steps = []
    for start, end in ((0, 97), (97, 290), *((t, t + 1) for t in range(290, 300))):
        rows = slice(start, end)
        steps.append(gate.score(1, q[rows], k[rows], v[rows], torch.arange(start, end),
                                state=state))
    torch.testing.assert_close(torch.cat(steps), whole, rtol=0, atol=1 / 64)
    assert (torch.cat(steps) == whole).float().mean() > 0.99
    # A decode step of two requests at once advances each one's own context.
    other = gate.new_state(2, 2)
    other[0] = state[0]
    q2, k2, v2 = _tokens(2, seed=6)
    both = gate.score(1, q2, k2, v2, torch.tensor([300, 0]), segments=torch.tensor([0, 1, 2]),
                      state=other)
    alone = gate.score(1, q2[:1], k2[:1], v2[:1], torch.tensor([300]), state=state)
    torch.testing.assert_close(both[:1], alone)
    torch.testing.assert_close(other[0], state[0])


def test_a_token_s_score_depends_on_earlier_tokens_only():
    gate = _gate(1)
    q, k, v = _tokens(9, seed=3)
    full = gate.score(0, q, k, v, torch.arange(9))
    prefix = gate.score(0, q[:5], k[:5], v[:5], torch.arange(5))
    torch.testing.assert_close(full[:5], prefix)


def test_scores_are_the_same_at_any_offset():
    gate = _gate(2)
    q, k, v = _tokens(6, seed=4)
    scores = []
    for start in (0, 700):
        positions = torch.arange(start, start + 6)
        features = gate.features(rotate(q, positions, 10000.0), rotate(k, positions, 10000.0),
                                 v, positions)
        scores.append(gate(0, features))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def test_gate_weights_round_trip(tmp_path):
    gate = _gate(3)
    path = tmp_path / "gate-test.safetensors"
    gate.save(path, {"steps": 0})
    loaded = load_scorer(str(path), "gate")
    assert isinstance(loaded, AttentionGates) and loaded.hidden == 8
    for name, tensor in gate.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
