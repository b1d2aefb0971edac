"""The retaining heads: RoPE undone exactly, scores independent of position, weights
round-trip, and weights refused for a model they were not trained for."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from vllm_kvcompress.scorers.retaining_heads import RetainingHeads
from vllm_kvcompress.scorers.rope import rotate
from vllm_kvcompress.scorers.trained_scorer import ModelShape
from vllm_kvcompress.scorers.weights import check_model, load_scorer

CONFIG = LlamaConfig(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                     hidden_size=96, head_dim=16, vocab_size=100, rope_theta=10000.0)


def test_rotate_matches_transformers_rope():
    positions = torch.tensor([0, 3, 17, 500])
    x = torch.randn(1, 2, 4, 16)  # [batch, heads, tokens, D] as transformers lays it out
    cos, sin = LlamaRotaryEmbedding(CONFIG)(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours = rotate(x[0].transpose(0, 1), positions, 10000.0)         # [tokens, heads, D]
    torch.testing.assert_close(ours, expected[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    back = rotate(ours, positions, 10000.0, inverse=True)
    torch.testing.assert_close(back, x[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_a_token_scores_the_same_at_any_position():
    torch.manual_seed(0)
    heads = RetainingHeads(ModelShape.of_config(CONFIG), hidden=8)
    q, k, v = torch.randn(5, 2, 3, 16), torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    scores = []
    for start in (0, 1000):
        positions = torch.arange(start, start + 5)
        features = heads.features(rotate(q, positions, 10000.0), rotate(k, positions, 10000.0),
                                  v, positions)
        scores.append(heads(1, features))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    # Scoring a subset of KV heads (one tensor-parallel rank) gives those heads' scores.
    positions = torch.arange(5)
    torch.testing.assert_close(heads.score(1, q[:, 1:], k[:, 1:], v[:, 1:], positions, first_head=1),
                               heads.score(1, q, k, v, positions)[:, 1:])


def test_weights_round_trip_and_model_check(tmp_path):
    torch.manual_seed(1)
    heads = RetainingHeads(ModelShape.of_config(CONFIG), hidden=8)
    path = tmp_path / "locret-test.safetensors"
    heads.save(path, {"steps": 0})
    loaded = load_scorer(str(path), "locret")
    for name, tensor in heads.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert (tmp_path / "locret-test.json").read_text().strip().startswith("{")
    check_model(loaded, CONFIG)
    other = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 4})
    with pytest.raises(ValueError, match="trained for another model.*num_layers=3"):
        check_model(loaded, other)
    with pytest.raises(ValueError, match="holds locret weights, not gate.*train gate"):
        load_scorer(str(path), "gate")


@pytest.mark.parametrize("kind", ["locret", "gate"])
def test_missing_weights_name_the_training_command(tmp_path, kind):
    with pytest.raises(ValueError, match=f"vllm-kvcompress train {kind}"):
        load_scorer(str(tmp_path / "absent.safetensors"), kind)
