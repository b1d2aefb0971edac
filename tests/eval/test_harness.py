"""The harness end to end on the reference runner: a tight budget is measured, and the
table, JSON and plot come out."""

from __future__ import annotations

import json

from vllm_kvcompress.eval.harness import evaluate
from vllm_kvcompress.eval.plot import plot_accuracy
from vllm_kvcompress.eval.results import format_table, summarize, write_results
from vllm_kvcompress.eval.settings import Setting, settings_grid
from vllm_kvcompress.eval.tasks import make_samples


def test_tight_budget_is_measured_and_reported(runner, count_tokens, tmp_path):
    samples = make_samples(["passkey"], [256], num_samples=2, seed=0, count_tokens=count_tokens)
    settings = settings_grid(["none", "snapkv", "streaming"], [16])
    records = evaluate(runner, samples, settings)

    assert len(records) == len(samples) * len(settings)
    summary = summarize(records)
    assert {row.setting for row in summary} == {s.label for s in settings}
    for row in summary:
        assert row.n == 2 and 0.0 <= row.accuracy <= 1.0
    dense = next(row for row in summary if row.setting == "dense")
    tightest = next(row for row in summary if row.setting == "streaming@16")
    assert dense.accuracy == 1.0  # the bundled model finds a passkey in 256 tokens
    assert tightest.accuracy <= dense.accuracy
    # KV bytes held at the end of each answer: all of it dense, about 16 of ~260 tokens.
    assert dense.kv_fraction == 1.0 and 0.04 < tightest.kv_fraction < 0.12
    assert all(r.kv_bytes > 0 for r in records)

    table = format_table(summary)
    assert "| dense | 100 | 100 | 100.0% |" in table and "passkey 256 (n=2)" in table
    write_results(tmp_path / "results.json", {"runner": "reference"}, records)
    document = json.loads((tmp_path / "results.json").read_text())
    assert len(document["records"]) == len(records) and document["summary"][0]["n"] == 2
    plot_accuracy(summary, tmp_path / "accuracy.png", "test")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_settings_grid_and_labels():
    grid = settings_grid(["none", "snapkv"], [64, 128], window=8)
    assert [s.label for s in grid] == ["dense", "snapkv@64", "snapkv@128"]
    assert grid[0].plugin_settings() == {"kv_policy": "none"}
    assert grid[1].plugin_settings() == {"kv_policy": "snapkv", "budget": 64, "kv_interval": 16,
                                         "kv_window": 8}
    assert Setting("h2o", 32) == Setting("h2o", 32)
    grid = settings_grid(["snapkv", ("mikv", {"key_bits": 4})], [], options={"key_bits": 2},
                         memory_fractions=[0.25])
    assert [s.label for s in grid] == ["snapkv[key_bits=2]@25%", "mikv[key_bits=4]@25%"]


def test_memory_fraction_settings_get_a_budget_per_length(runner, count_tokens):
    samples = make_samples(["passkey"], [256, 384], num_samples=1, seed=0,
                           count_tokens=count_tokens)
    settings = settings_grid(["snapkv", "mikv"], [], memory_fractions=[0.5])
    records = evaluate(runner, samples, settings, shape=runner.kv_shape)
    by_length = {(r.policy, r.target_length): r for r in records}
    # snapkv keeps half the tokens; mikv keeps fewer at full precision, the rest at ~1/4.
    for length in (256, 384):
        snapkv, mikv = by_length["snapkv", length], by_length["mikv", length]
        assert snapkv.budget == samples[length == 384].num_tokens // 2
        assert mikv.budget < snapkv.budget
        for record in (snapkv, mikv):
            assert 0.4 < record.kv_fraction <= 0.55
    # A memory no budget of a setting reaches: skipped, and said so, at each length.
    skipped = []
    tight = settings_grid(["mikv"], [], memory_fractions=[0.125])
    assert evaluate(runner, samples, tight, shape=runner.kv_shape,
                    on_skip=lambda setting, length, why: skipped.append((length, why))) == []
    assert [length for length, _ in skipped] == [256, 384]
    assert "at any budget" in skipped[0][1]
