"""`vllm-kvcompress cache-trace` and `cache-sim`, as a user runs them."""

from __future__ import annotations

import json

import pytest

from vllm_kvcompress.cli import main
from vllm_kvcompress.sharing.traces import TraceError, parse_line, read_trace


def test_synthetic_trace_replays_to_one_json_object(tmp_path, capsys):
    trace = tmp_path / "chat.jsonl"
    assert main(["cache-trace", "multi-turn", str(trace), "--seed", "1"]) == 0
    assert read_trace(trace)[0].discard is not None
    capsys.readouterr()
    assert main(["cache-sim", str(trace), "--cache-pages", "128", "--json", "--flip", "0.1"]) == 0
    rates = json.loads(capsys.readouterr().out)
    assert {"lru", "belady", "perfect", "learned", "flip-0.1", "adversarial", "hints"} <= set(rates)
    assert rates["lru"] < rates["belady"] and rates["perfect"] >= 0.95 * rates["belady"]
    assert rates["adversarial_misses"] <= rates["adversarial_misses_bound"]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 3: not JSON"),
    ('{"pages": "abc"}', 'line 3: "pages" must be a list'),
    ('{"pages": ["a", "b"], "discard": [1]}', 'line 3: "discard" must be a list of 0/1'),
    ('{"pages": ["a"], "discard": [2]}', 'line 3: "discard" must be a list of 0/1'),
])
def test_bad_trace_lines_name_their_line(line, problem):
    with pytest.raises(TraceError, match=problem):
        parse_line(line, 3)


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"pages": ["a", "b", "c"]}\n\n{"pages": [1]}\n')
    with pytest.raises(SystemExit):
        main(["cache-sim", str(trace), "--cache-pages", "8"])
    assert "line 3" in capsys.readouterr().err
    trace.write_text('{"pages": ["a", "b", "c"]}\n')
    with pytest.raises(SystemExit):
        main(["cache-sim", str(trace), "--cache-pages", "2"])
    assert "--cache-pages 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache-sim", str(trace), "--cache-pages", "8", "--flip", "2"])
    assert "--flip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache-sim", str(tmp_path / "missing.jsonl"), "--cache-pages", "8"])
    assert "no such file" in capsys.readouterr().err
