"""`vllm-kvcompress eval tasks|perplexity` write their files and print their tables."""

from __future__ import annotations

import json

import pytest

from vllm_kvcompress.cli import main
from vllm_kvcompress.eval.long_text import DEFAULT_TEXT


def test_eval_tasks_writes_results_plot_and_table(tmp_path, capsys):
    assert main(["eval", "tasks", "--tasks", "passkey", "--lengths", "192", "--samples", "1",
                 "--policies", "none,streaming", "--budgets", "16", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert [row["setting"] for row in document["summary"]] == ["dense", "streaming@16"]
    assert (tmp_path / "accuracy.png").exists()
    assert "| streaming@16 |" in capsys.readouterr().out


def test_eval_takes_policy_options_and_memory_fractions(tmp_path, capsys):
    assert main(["eval", "tasks", "--tasks", "passkey", "--lengths", "192", "--samples", "1",
                 "--policies", "mikv:key_bits=4:lowbit_budget=null",
                 "--policy-args", '{"value_bits": 2}', "--memory-fraction", "0.5",
                 "--out", str(tmp_path)]) == 0
    (record,) = json.loads((tmp_path / "results.json").read_text())["records"]
    assert record["setting"] == "mikv[key_bits=4,lowbit_budget=None,value_bits=2]@50%"
    assert 0.4 < record["kv_fraction"] <= 0.55 and record["budget"] > 0
    assert "KV bytes" in capsys.readouterr().out


def test_eval_leaves_out_settings_a_memory_fraction_cannot_reach(tmp_path, capsys):
    """At 20% of the KV bytes uncapped mikv cannot run (its 4 + 2-bit tier alone takes 25%):
    the sweep runs what it can and says what it left out."""
    assert main(["eval", "tasks", "--tasks", "passkey", "--lengths", "192", "--samples", "1",
                 "--policies", "snapkv,mikv", "--memory-fraction", "0.2",
                 "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert [row["setting"] for row in document["summary"]] == ["snapkv@20%"]
    assert "left out mikv@20%" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "message"), [
    (["--policies", "mikv:key_bits=9"], "kv_policy_args.key_bits=9: must be an integer >= 1 and <= 8"),
    (["--policies", "mikv:key_bits"], "name:key=value"),
    (["--policies", "mikv", "--memory-fraction", "0.05"], "at any budget"),
    (["--memory-fraction", "1.5"], "each must be in (0, 1]"),
])
def test_eval_refuses_bad_policy_settings_before_running(tmp_path, arguments, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        main(["eval", "tasks", "--tasks", "passkey", "--lengths", "192", "--samples", "1",
              "--out", str(tmp_path), *arguments])


def test_eval_rejects_unknown_tasks(tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        main(["eval", "tasks", "--tasks", "passkey,nope", "--out", str(tmp_path)])


@pytest.mark.skipif(not DEFAULT_TEXT.is_file(), reason="no GPL-3 text on this machine")
def test_eval_perplexity_writes_results(tmp_path, capsys):
    assert main(["eval", "perplexity", "--prefix", "64", "--scored", "4", "--policies",
                 "none,h2o", "--budgets", "32", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "perplexity.json").read_text())["results"]
    assert [r["setting"] for r in results] == ["dense", "h2o@32"]
    assert "| h2o@32 |" in capsys.readouterr().out
