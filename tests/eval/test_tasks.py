"""Task generators: seeded, on target length (in the model's tokens), answers inside."""

from __future__ import annotations

import pytest

from vllm_kvcompress.eval.tasks import TASKS, make_samples, sweep_depths

LENGTHS = [512, 2048]


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_hit_the_target_length_and_hold_the_answer(task, count_tokens):
    samples = make_samples([task], LENGTHS, num_samples=2, seed=0, count_tokens=count_tokens)
    assert len(samples) == 2 * len(LENGTHS)
    for sample in samples:
        assert sample.num_tokens == count_tokens(sample.prompt)
        # Never longer than asked, and short by less than one filler unit (a JSON pair
        # of UUIDs, 50-75 tokens, is the largest).
        assert sample.target_length - 96 <= sample.num_tokens <= sample.target_length
        for reference in sample.references:
            assert reference in sample.prompt


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_are_seeded(task, count_tokens):
    def prompts(seed):
        return [s.prompt for s in make_samples([task], [512], 2, seed, count_tokens)]

    assert prompts(0) == prompts(0)
    assert prompts(0) != prompts(1)


def test_depth_sweep_moves_the_needle(count_tokens):
    samples = make_samples(["passkey"], [1024], num_samples=4, seed=0, count_tokens=count_tokens)
    assert [s.depth for s in samples] == sweep_depths(4) == [0.125, 0.375, 0.625, 0.875]
    offsets = [s.prompt.index(s.references[0]) / len(s.prompt) for s in samples]
    assert offsets == sorted(offsets)
    for sample, offset in zip(samples, offsets):
        assert abs(offset - sample.depth) < 0.05
