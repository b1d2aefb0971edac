"""Learning a budget profile: curves from the frozen model, shares that favour the heads
whose attention is spread, the retention curves a quality target reads."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.policies.quality_budget import check_curves
from vllm_kvcompress.training.profile import (MAX_SHARE, MIN_SHARE, mass_curves,
                                              profile_examples, retention_curves,
                                              shares_for_budget)
from vllm_kvcompress.training.trainer import FrozenModel


def test_spread_attention_gets_the_larger_share():
    k = torch.arange(1, 257, dtype=torch.float64)
    concentrated = 1 - 0.8 ** k                      # 90% of its mass in 10 tokens
    spread = (k / 256) ** 0.9                        # nearly every token as needed as the next
    curves = torch.stack([concentrated, spread, spread, concentrated]).view(2, 2, 256)
    shares = shares_for_budget(curves, budget=32)
    assert shares.mean() == pytest.approx(1.0)
    assert bool((shares >= MIN_SHARE * 0.99).all()) and bool((shares <= MAX_SHARE * 1.01).all())
    assert shares[0, 1] > 1 > shares[0, 0] and shares[1, 0] > 1 > shares[1, 1]


def test_curves_and_retention_from_the_model(model_dir):
    frozen = FrozenModel(model_dir)
    examples = profile_examples(frozen, 2, seed=5, num_words=150)
    curves = mass_curves(frozen, examples, length=16)
    assert curves.shape == (frozen.shape.num_layers, frozen.shape.num_kv_heads, 16)
    assert bool((curves.diff(dim=-1) >= -1e-12).all()) and float(curves.max()) <= 1 + 1e-9
    retention = retention_curves(frozen, examples, {})
    assert check_curves(retention) is None
    assert retention["oracle"][-1] == 1.0
    # No ranking keeps more of the label's mass than the label's own.
    assert all(o >= s for o, s in zip(retention["oracle"], retention["snapkv"]))
