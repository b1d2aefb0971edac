"""Training the trained scorers on the bundled model: seeded, and the loss falls."""

from __future__ import annotations

import random

import pytest

from vllm_kvcompress.training.examples import make_example
from vllm_kvcompress.training.trainer import FrozenModel, train_scorer


@pytest.fixture(scope="module")
def frozen(model_dir):
    return FrozenModel(model_dir)


def test_examples_put_the_question_after_the_context(frozen):
    rng = random.Random(0)
    kinds = set()
    for _ in range(12):
        example = make_example(frozen.tokenizer, rng, 120)
        kinds.add(example.kind)
        assert 0 < example.region_start <= example.prompt_len <= len(example.token_ids)
        if example.kind != "plain":
            answer = frozen.tokenizer.decode(example.token_ids[example.prompt_len:])
            assert answer.strip(" .").isdigit()
    assert kinds == {"passkey", "needle", "plain"}


# The trainer is shared; the gate's model trains in the slow suite (70 s on 2 cores).
@pytest.mark.parametrize("kind", ["locret", pytest.param("gate", marks=pytest.mark.slow)])
def test_training_is_seeded_and_the_loss_falls(frozen, kind):
    _, losses = train_scorer(frozen, kind, steps=2, seed=3, num_words=150)
    _, repeat = train_scorer(frozen, kind, steps=2, seed=3, num_words=150)
    _, other_seed = train_scorer(frozen, kind, steps=2, seed=4, num_words=150)
    assert repeat == losses
    assert other_seed != losses
    _, longer = train_scorer(frozen, kind, steps=16, seed=3, num_words=150)
    assert sum(longer[-4:]) / 4 < 0.5 * sum(longer[:4]) / 4
