"""`vllm-kvcompress batch`: an OpenAI batch file planned, run by vLLM's run-batch, answered
in the input's order."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from vllm_kvcompress.cli import main
from vllm_kvcompress.sharing.batch_file import engine_flags, in_input_order, planned_lines

SYSTEMS = ["You are a terse assistant for the city archive. " * 12,
           "You answer questions about the river survey, citing page numbers. " * 12]


def chat_line(custom_id: str, system: str, question: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "m", "messages": [
                           {"role": "system", "content": system},
                           {"role": "user", "content": question}], **body}})


def shuffled_batch(seed: int = 0, max_tokens: int = 4) -> list[str]:
    lines = [chat_line(f"s{s}q{q}", SYSTEMS[s], f"Question {q}: what is on shelf {q * 7}?",
                       max_tokens=max_tokens, temperature=0)
             for s in range(2) for q in range(3)]
    random.Random(seed).shuffle(lines)
    return lines


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_chat_requests_run_grouped_with_hints(tokenizer):
    lines = shuffled_batch()
    embedding = json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                            "body": {"input": "x"}})
    mine = chat_line("mine", SYSTEMS[0], "Mine.", vllm_xargs={"kv_cache_hint": "keep"})
    planned = planned_lines([lines[0], embedding, *lines[1:], mine], tokenizer, 32, hints=True)
    assert json.loads(planned[0])["custom_id"] == "e"      # unplanned lines first
    ids = [json.loads(line)["custom_id"] for line in planned[1:]]
    assert sorted(ids) == sorted([json.loads(line)["custom_id"] for line in lines] + ["mine"])
    systems = [name[:2] for name in ids if name != "mine"]
    assert sum(a != b for a, b in zip(systems, systems[1:])) == 1
    hints = {json.loads(line)["custom_id"]: json.loads(line)["body"]["vllm_xargs"]["kv_cache_hint"]
             for line in planned[1:]}
    assert hints["mine"] == "keep"                         # the caller's own hint stays
    assert all(set(bits) <= {0, 1} and bits for name, bits in hints.items() if name != "mine")
    without = planned_lines(lines, tokenizer, 32, hints=False)
    assert all("vllm_xargs" not in json.loads(line)["body"] for line in without)
    grouped = [json.loads(line) for line in planned_lines(lines, tokenizer, 32, False, True)]
    group_of = {r["custom_id"]: r["body"]["vllm_xargs"]["kv_group"] for r in grouped}
    # One group per system prompt; no bits asked for, none sent.
    by_system: dict[str, set] = {}
    for name, group in group_of.items():
        by_system.setdefault(name[:2], set()).add(group)
    assert all(len(groups) == 1 for groups in by_system.values())
    assert len(set(group_of.values())) == len(SYSTEMS)
    assert all("kv_cache_hint" not in r["body"]["vllm_xargs"] for r in grouped)


def test_answers_come_back_in_input_order():
    inputs = [json.dumps({"custom_id": c}) for c in "abc"]
    answers = [json.dumps({"custom_id": c, "response": {}}) for c in "cab"]
    ordered = in_input_order(inputs, answers)
    assert [json.loads(line)["custom_id"] for line in ordered] == list("abc")


def test_engine_flags_give_page_size_and_bits():
    assert engine_flags([]) == (128, False, False)
    flags = ["--kv-policy", "snapkv", "--kv-cache-replacement", "predicted"]
    assert engine_flags(flags) == (32, True, False)
    assert engine_flags(["--block-size", "16", "--kv-policy=none"]) == (16, False, False)
    assert engine_flags(["--kv-scheduling", "batch"]) == (128, False, True)


@pytest.mark.slow    # two `vllm run-batch` processes
def test_batch_command_matches_the_unplanned_run_and_reports_bad_lines(model_dir, tmp_path):
    lines = shuffled_batch(seed=1)
    bad_type = chat_line("hot", SYSTEMS[0], "Hi", temperature="hot")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([lines[0], "{not json", *lines[1:3], bad_type, *lines[3:]]) + "\n")
    flags = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
             "--served-model-name", "m"]
    answers = {}
    for name, extra in (("planned", ["--kv-cache-replacement", "predicted"]),
                        ("as given", ["--no-plan"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["batch", str(source), str(out), "--model", str(model_dir),
                     *flags, *extra]) == 0
        answers[name] = [json.loads(line) for line in out.read_text().splitlines()]
    planned = answers["planned"]
    assert [o["custom_id"] for o in planned] == \
        [json.loads(lines[0])["custom_id"], None, *(json.loads(x)["custom_id"] for x in lines[1:3]),
         "hot", *(json.loads(x)["custom_id"] for x in lines[3:])]
    assert planned[1]["error"].startswith("line 2: ") and "JSON" in planned[1]["error"]
    assert planned[4]["error"].startswith("line 5: body.temperature")
    good = [o for o in planned if o["custom_id"] not in (None, "hot")]
    assert len(good) == 6 and all(o["response"]["status_code"] == 200 for o in good)
    # Greedy answers do not depend on the order the batch ran in.
    def texts(outputs):
        return [o["response"]["body"]["choices"][0]["message"]["content"]
                for o in outputs if o["custom_id"] not in (None, "hot")]
    assert texts(planned) == texts(answers["as given"]) and all(texts(planned))
