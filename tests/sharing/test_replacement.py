"""Replacement policies and the trace simulator on hand-made and random traces."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvcompress.sharing.cache_sim import belady, replay
from vllm_kvcompress.sharing.predictors import (
    OnlinePredictor,
    exact_hints,
    flip_bits,
    perfect_discard_bits,
    perfect_phase_bits,
    phase_starts,
)
from vllm_kvcompress.sharing.replacement import LRU, Marking, chain_bits, make_replacement
from vllm_kvcompress.sharing.traces import GENERATORS, TraceRequest, chain


def singles(names: str) -> list[TraceRequest]:
    """One single-page request per letter: classic paging."""
    return [TraceRequest([name]) for name in names]


def random_trace(seed: int, requests: int = 120) -> list[TraceRequest]:
    """Chains over a small tree of prompts, so pages repeat at several depths."""
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        system = f"s{rng.randrange(3)}"
        body = [f"{system}.{i}" for i in range(rng.randint(1, 3))]
        body += [f"d{rng.randrange(8)}.{i}" for i in range(rng.randint(0, 3))]
        out.append(TraceRequest(chain(body)))
    return out


def test_cyclic_access_lru_never_hits_belady_does():
    trace = singles("ABCABCABC")
    assert replay(trace, 2, LRU()).hits == 0
    # Farthest-in-future by hand: C evicts B, A hits, B evicts A, C hits, A evicts C, B hits.
    assert belady(trace, 2)[0].hits == 3


def test_perfect_discard_bits_reach_belady_by_hand():
    trace = singles("ABCABCABC")
    bits = perfect_discard_bits(trace, 2)
    assert replay(trace, 2, Marking(2), bits).hits == 3


def test_chain_hits_stop_at_first_miss():
    trace = [TraceRequest(["a", "b", "c"]), TraceRequest(["a", "x", "c"])]
    result = replay(trace, 8, LRU())
    assert (result.hits, result.lookups) == (1 + 0, 6)   # "c" after a miss does not count


def test_lru_frees_a_chain_tail_first():
    # Cache of 3: the second request must evict one page of the first; vLLM's order
    # (tail first) keeps the prefix, so the third request still hits "a".
    trace = [TraceRequest(["a", "b"]), TraceRequest(["x", "y"]), TraceRequest(["a", "z"])]
    assert replay(trace, 3, LRU()).hits == 1


def test_cache_smaller_than_a_request_is_refused():
    with pytest.raises(ValueError, match="--cache-pages 1"):
        replay([TraceRequest(["a", "b"])], 1, LRU())


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="lru, predicted, predicted-phase"):
        make_replacement("lfu", 8)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(6, 30))
def test_marking_without_bits_is_exactly_lru(seed, capacity):
    trace = random_trace(seed)
    lru, marking = LRU(), Marking(capacity, slack=0.0)
    victims = []

    class Recorder:
        """Wraps a policy and records its victims."""
        def __init__(self, policy):
            self.policy, self.name = policy, policy.name
        def __getattr__(self, attr):
            return getattr(self.policy, attr)
        def pop_victim(self):
            victims.append(self.policy.pop_victim())
            return victims[-1]

    replay(trace, capacity, Recorder(lru))
    lru_victims, victims[:] = list(victims), []
    replay(trace, capacity, Recorder(marking))
    assert victims == lru_victims


@settings(max_examples=30, deadline=None)
@given(names=st.text("ABCDEFGHIJ", min_size=1, max_size=200), capacity=st.integers(1, 6))
def test_perfect_bits_match_belady_on_classic_paging(names, capacity):
    trace = singles(names)
    best = belady(trace, capacity)[0].hits
    bits = perfect_discard_bits(trace, capacity)
    assert replay(trace, capacity, Marking(capacity), bits).hits == best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(6, 30))
def test_perfect_bits_on_chains_are_near_belady(seed, capacity):
    # Page-level Belady is not optimal for chain hits (a lookup stops at the first miss):
    # marking with consistent chain bits may beat it, and must not trail it by much.
    trace = random_trace(seed)
    best = belady(trace, capacity)[0].hits
    perfect = replay(trace, capacity, Marking(capacity), perfect_discard_bits(trace, capacity))
    assert perfect.hits >= 0.95 * best


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(6, 30), rate=st.sampled_from([0.3, 1.0]))
def test_wrong_bits_stay_within_the_guard_bound(seed, capacity, rate):
    trace = random_trace(seed)
    policy = Marking(capacity)
    bits = flip_bits(perfect_discard_bits(trace, capacity), rate, seed)
    result = replay(trace, capacity, policy, bits)   # replay asserts every victim was evictable
    longest = max(len(r.pages) for r in trace)
    assert result.misses <= policy.bound(policy.shadow.misses, longest)
    assert policy.shadow.misses == replay(trace, capacity, LRU()).misses


def test_phase_bits_follow_marking_phases():
    trace = singles("ABCABD")
    assert phase_starts(trace, 2) == [0, 0, 1, 1, 2, 2]
    # A and B are used in phase 0; phase 1 (C, A) uses A only; phase 2 (B, D) uses neither.
    assert perfect_phase_bits(trace, 2) == [[0], [1], [1], [1], [1], [1]]


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_are_seeded_and_perfect_bits_beat_lru(kind):
    trace = GENERATORS[kind](seed=3)
    assert [r.pages for r in trace] == [r.pages for r in GENERATORS[kind](seed=3)]
    capacity = 128
    lru = replay(trace, capacity, LRU()).hit_rate
    best = belady(trace, capacity)[0].hit_rate
    perfect = replay(trace, capacity, Marking(capacity),
                     perfect_discard_bits(trace, capacity)).hit_rate
    assert lru < best and perfect >= best * 0.95


def test_learned_predictor_closes_part_of_the_gap_on_rag():
    trace = GENERATORS["rag"](requests=1500, seed=1)
    capacity = 128
    lru = replay(trace, capacity, LRU()).hit_rate
    best = belady(trace, capacity)[0].hit_rate
    learned = replay(trace, capacity, Marking(capacity),
                     predictor=OnlinePredictor(capacity)).hit_rate
    assert learned > lru + 0.25 * (best - lru)


def test_learned_predictor_is_deterministic():
    trace = GENERATORS["system-prompts"](requests=600, seed=2)
    runs = [replay(trace, 64, Marking(64), predictor=OnlinePredictor(64)).hits for _ in range(2)]
    assert runs[0] == runs[1]


def test_chain_bits_keep_every_prefix_of_a_kept_page():
    assert chain_bits([1, 0, 1, 1]) == [0, 0, 1, 1]
    assert chain_bits([1, None, 1]) == [1, None, 1]
    assert chain_bits([None, 0, 1]) == [None, 0, 1]
    assert chain_bits([]) == []


def test_exact_hints_are_belady_bits_of_the_batch():
    shared = [7] * 64                    # two full pages every prompt starts with
    prompts = [shared + [1] * 40, [9] * 70, shared + [2] * 33]
    hints = exact_hints(prompts, cache_pages=4, page_tokens=32)
    # Full pages only; the shared pages are read again by the third prompt, nothing else is.
    assert hints == [[0, 0, 1], [1, 1], [1, 1, 1]]
    # With room for 3 pages the second prompt pushes out a shared page: the deeper one,
    # and a chain's bits stay consistent (no kept page after a discarded one).
    assert exact_hints(prompts, cache_pages=3, page_tokens=32)[0] == [0, 1, 1]
