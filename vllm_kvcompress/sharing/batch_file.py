"""`vllm-kvcompress batch INPUT OUTPUT --model M [vLLM flags]`: an OpenAI batch file (the
format of `vllm run-batch`) run in its plan's order.

The chat requests of INPUT are tokenized with the model's chat template, planned
(batch_plan.py) and written in plan order, each with its page bits as `kv_cache_hint` in
`vllm_xargs` when `--kv-cache-replacement predicted` is among the flags, and its group as
`kv_group` with `--kv-scheduling batch` (shared pages held for the members still to run);
vLLM's own `run-batch` answers that file (every OpenAI field, the same output format), and OUTPUT
gets the answers in INPUT's order. Lines that are not chat completions (embeddings,
transcriptions) go first, unplanned; lines vLLM's parser refuses (bad JSON, bad field
types), which would stop vLLM's whole batch, get an error line with their line number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vllm_kvcompress.sharing.batch_plan import plan_batch

CHAT_URL = "/v1/chat/completions"
# Without max_tokens a chat answer may run to max_model_len: rank it as decode-heavy.
UNSET_MAX_TOKENS = 1024


def planned_lines(lines: Sequence[str], tokenizer, page_tokens: int,
                  hints: bool, groups: bool = False) -> list[str]:
    """INPUT's lines in the order to run them, chat requests planned (with their bits
    and groups in vllm_xargs if `hints`, `groups`)."""
    chat, prompts, other = [], [], []
    for line in lines:
        prompt = _chat_prompt(line, tokenizer)
        if prompt:
            chat.append(line)
            prompts.append(prompt)
        else:
            other.append(line)
    if len(chat) < 2:
        return list(lines)
    bodies = [json.loads(line)["body"] for line in chat]
    max_tokens = [body.get("max_completion_tokens") or body.get("max_tokens")
                  or UNSET_MAX_TOKENS for body in bodies]
    plan = plan_batch(prompts, max_tokens, page_tokens)
    out = list(other)
    for index in plan.order:
        line = chat[index]
        extra = plan.extra_args(index, hints, groups)
        if extra:
            request = json.loads(line)
            body = request["body"]
            body["vllm_xargs"] = {**extra, **body.get("vllm_xargs", {})}   # the caller's win
            line = json.dumps(request)
        out.append(line)
    return out


def _chat_prompt(line: str, tokenizer) -> list[int] | None:
    """The token ids of a chat request's prompt; None for any other line (vLLM answers or
    rejects those itself)."""
    body = _chat_body(line)
    if body is None:
        return None
    try:
        text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    except Exception:   # a malformed conversation: vLLM's own error line reports it
        return None


def _chat_body(line: str) -> dict | None:
    try:
        request = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get("url") != CHAT_URL:
        return None
    body = request.get("body")
    if (not isinstance(body, dict) or not isinstance(body.get("messages"), list)
            or not isinstance(request.get("custom_id"), str)):
        return None
    return body


def in_input_order(input_lines: Sequence[str], output_lines: Sequence[str]) -> list[str]:
    """vLLM's answers sorted back to INPUT's order by custom_id (unmatched ones last)."""
    position = {}
    for index, line in enumerate(input_lines):
        try:
            position.setdefault(json.loads(line).get("custom_id"), index)
        except (json.JSONDecodeError, AttributeError):
            continue

    def key(line: str) -> int:
        try:
            return position.get(json.loads(line).get("custom_id"), len(input_lines))
        except (json.JSONDecodeError, AttributeError):
            return len(input_lines)
    return sorted(output_lines, key=key)


def engine_flags(vllm_args: Sequence[str]) -> tuple[int, bool, bool]:
    """(page tokens, whether to send bits, whether to send groups) from the flags passed
    on to vLLM: --block-size if given, else 32 with compression and vLLM's CPU default of
    128 without; bits with --kv-cache-replacement predicted; groups with --kv-scheduling
    batch."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--kv-policy", default="none")
    parser.add_argument("--kv-cache-replacement", default="lru")
    parser.add_argument("--kv-scheduling", default="vllm")
    known, _ = parser.parse_known_args(list(vllm_args))
    page_tokens = known.block_size or (32 if known.kv_policy != "none" else 128)
    return (page_tokens, known.kv_cache_replacement == "predicted",
            known.kv_scheduling == "batch")


def run_batch_file(input_path: str, output_path: str, model: str, vllm_args: Sequence[str],
                   vllm_command: Sequence[str], plan: bool = True) -> int:
    """Plan INPUT, run `vllm run-batch` on its valid lines, write OUTPUT in INPUT's order
    (a refused line gets an error line naming its line number); vLLM's exit status."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.vllm_plugin.batch_lines import error_output, line_error  # vLLM's parser

    numbered = [(n, line) for n, line in enumerate(Path(input_path).read_text().splitlines(), 1)
                if line.strip()]
    refused = {n: error_output(line, n, error) for n, line in numbered
               if (error := line_error(line)) is not None}
    valid = [line for n, line in numbered if n not in refused]
    answers: list[str] = []
    if valid:
        page_tokens, hints, groups = engine_flags(vllm_args)
        tokenizer = AutoTokenizer.from_pretrained(model)
        ordered = planned_lines(valid, tokenizer, page_tokens, hints, groups) if plan else valid
        with tempfile.TemporaryDirectory() as folder:
            ordered_path, answers_path = Path(folder) / "in.jsonl", Path(folder) / "out.jsonl"
            ordered_path.write_text("\n".join(ordered) + "\n")
            status = subprocess.call([*vllm_command, "run-batch", "-i", str(ordered_path),
                                      "-o", str(answers_path), "--model", model, *vllm_args])
            if status != 0:
                return status
            answers = in_input_order(valid, [line for line in answers_path.read_text()
                                             .splitlines() if line.strip()])
    answered = iter(answers)
    out = [refused[n] if n in refused
           else next(answered, None) or error_output(line, n, "vLLM returned no answer")
           for n, line in numbered]
    Path(output_path).write_text("\n".join(out) + "\n")
    return 0
