"""CompressionSchedule.peak_pages (what batch admission reserves) against a step-by-step
replay of the KV manager's rule: prompt in one step, then one token per step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.cache.schedule import CompressionSchedule


def replayed_peak(schedule: CompressionSchedule, prompt_len: int, final_len: int,
                  num_computed: int = 0, compressed_at: int = 0) -> int:
    """The largest pages_for_step over the steps, compressing as the manager does."""
    peak, computed = 0, num_computed
    while computed < final_len:
        scheduled = prompt_len - computed if computed < prompt_len else 1
        peak = max(peak, schedule.pages_for_step(computed, scheduled, prompt_len, compressed_at))
        computed += scheduled
        if not compressed_at and schedule.should_compress(computed, 0, prompt_len):
            compressed_at = computed
    return peak


SCHEDULES = [
    CompressionSchedule(budget=64, interval=16, block_size=32),
    CompressionSchedule(budget=64, interval=16, block_size=32, shared_prefix=True),
    CompressionSchedule(budget=100, interval=8, block_size=16, layer_budget=140),
    CompressionSchedule(budget=64, interval=16, block_size=32, second_tier="low_bit",
                        tier_slots_per_block=96, low_cap=300),
    CompressionSchedule(budget=64, interval=16, block_size=32, second_tier="narrow_key",
                        tier_slots_per_block=48, narrow_recent=8),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.second_tier or
                         ("shared" if s.shared_prefix else "plain"))
@settings(max_examples=60, deadline=None)
@given(prompt_len=st.integers(1, 700), extra=st.integers(1, 400))
def test_peak_pages_is_the_replayed_peak(schedule, prompt_len, extra):
    final_len = prompt_len + extra
    assert schedule.peak_pages(prompt_len, final_len) == \
        replayed_peak(schedule, prompt_len, final_len)


@pytest.mark.parametrize("schedule", SCHEDULES[:2])
def test_peak_pages_of_a_running_request_counts_only_what_is_ahead(schedule):
    # Compressed in its prefill step (500 >= 64 + 16): the prefill transient is behind it.
    ahead = schedule.peak_pages(500, 600, num_computed=550, compressed_at=500)
    assert ahead == replayed_peak(schedule, 500, 600, 550, 500)
    assert ahead < schedule.peak_pages(500, 600)


def test_uncompressed_growth_is_every_token():
    schedule = CompressionSchedule(budget=10_000, interval=16, block_size=32)
    assert schedule.peak_pages(100, 228) == 8            # ceil(228 / 32)


def replayed_chunked_peak(schedule: CompressionSchedule, prompt_len: int, final_len: int,
                          chunk: int) -> int:
    """The largest pages_for_step with the prompt in steps of `chunk` tokens."""
    peak, computed, compressed_at = 0, 0, 0
    while computed < final_len:
        scheduled = min(chunk, prompt_len - computed) if computed < prompt_len else 1
        peak = max(peak, schedule.pages_for_step(computed, scheduled, prompt_len, compressed_at))
        computed += scheduled
        if not compressed_at and schedule.should_compress(computed, 0, prompt_len):
            compressed_at = computed
    return peak


CHUNKED = [CompressionSchedule(budget=64, interval=16, block_size=32, prefill_mode="chunked"),
           CompressionSchedule(budget=64, interval=16, block_size=32, prefill_mode="chunked",
                               second_tier="low_bit", tier_slots_per_block=96, low_cap=300)]


@pytest.mark.parametrize("schedule", CHUNKED, ids=lambda s: s.second_tier or "plain")
@settings(max_examples=60, deadline=None)
@given(prompt_len=st.integers(1, 3000), extra=st.integers(1, 200), chunk=st.integers(1, 512))
def test_chunked_peak_pages_bounds_every_step_whatever_the_length(schedule, prompt_len, extra,
                                                                  chunk):
    final_len = prompt_len + extra
    bound = schedule.chunked_peak_pages(chunk, final_len)
    assert replayed_chunked_peak(schedule, prompt_len, final_len, chunk) <= bound
    # Past one compression's worth, the bound does not grow with the length (without a
    # tier that grows with it).
    if schedule.second_tier is None and final_len >= 2 * (schedule.budget + schedule.interval + chunk):
        assert bound == schedule.chunked_peak_pages(chunk, 10 * final_len)


def test_chunked_peak_pages_is_reached():
    schedule = CHUNKED[0]
    assert replayed_chunked_peak(schedule, 4000, 4010, 256) == \
        schedule.chunked_peak_pages(256, 4010) < 4000 // 32
