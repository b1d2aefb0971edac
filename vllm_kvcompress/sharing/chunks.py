"""Named chunks of a prompt (RAG passages): their spans, their identity, and the helper that
builds a prompt whose passages tokenize the same wherever they appear.

A request names its chunks as `vllm_xargs: {"kv_chunks": [start0, end0, start1, end1, ...]}`
over its prompt's token ids: sorted, non-overlapping, non-empty, inside the prompt. The
spans go flat because vLLM's API schema allows only flat lists in vllm_xargs; a list of
[start, end] pairs (offline) or a JSON string of either form is accepted too. A chunk's key
is a hash of its token ids and the model, so the same passage after different text, at a
different position, is the same chunk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

CHUNKS_KEY = "kv_chunks"
DEFAULT_TEMPLATE = "{passages}\n\n{question}"
PASSAGE_SEPARATOR = "\n\n"


def validate_chunks(value: object, prompt_len: int) -> list[tuple[int, int]]:
    """`value` as a list of (start, end) spans; ValueError naming kv_chunks if it is not
    sorted, non-overlapping [start, end) token spans with 0 <= start < end <= prompt_len,
    given flat ([s0, e0, s1, e1, ...]), as pairs, or as a JSON string of either."""
    allowed = ("token spans [start0, end0, start1, end1, ...] (or [[start, end], ...]), sorted, "
               f"non-overlapping, with 0 <= start < end <= the prompt's {prompt_len} tokens")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{CHUNKS_KEY} must be {allowed}; got {value!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"{CHUNKS_KEY} must be {allowed}; got {value!r}")
    if value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        if len(value) % 2:
            raise ValueError(f"{CHUNKS_KEY} must be {allowed}; a flat list needs an even length")
        value = [value[i:i + 2] for i in range(0, len(value), 2)]
    spans: list[tuple[int, int]] = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise ValueError(f"{CHUNKS_KEY} must be {allowed}; bad span {item!r}")
        start, end = item
        if not 0 <= start < end <= prompt_len:
            raise ValueError(f"{CHUNKS_KEY} span {[start, end]} is empty or outside the prompt; "
                             f"allowed: {allowed}")
        if spans and start < spans[-1][1]:
            raise ValueError(f"{CHUNKS_KEY} span {[start, end]} overlaps or precedes "
                             f"{list(spans[-1])}; allowed: {allowed}")
        spans.append((start, end))
    return spans


def chunk_key(token_ids: Sequence[int], model: str) -> str:
    """Hex digest naming a chunk: its token ids under one model."""
    digest = hashlib.sha256(model.encode())
    digest.update(b"\0" + b",".join(str(int(t)).encode() for t in token_ids))
    return digest.hexdigest()[:32]


def rag_prompt(tokenizer, passages: Sequence[str], question: str,
               template: str | None = None) -> dict:
    """Request fields for a prompt of retrieved passages followed by a question.

    Each passage is tokenized on its own, so its token ids (and its chunk key) do not
    depend on the text around it. template: text with "{passages}" and "{question}"
    (default DEFAULT_TEMPLATE); passages are joined by a blank line. Returns
    {"prompt": [token ids], "vllm_xargs": {"kv_chunks": [start0, end0, ...]}}, to merge
    into a completions request body.
    """
    template = template or DEFAULT_TEMPLATE
    if template.count("{passages}") != 1 or template.count("{question}") != 1:
        raise ValueError("template must contain {passages} and {question} once each; "
                         f"got {template!r}")
    if not passages:
        raise ValueError("passages must not be empty")
    head, rest = template.split("{passages}")
    between, tail = rest.split("{question}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    ids = bos + _encode(tokenizer, head)
    spans = []
    for index, passage in enumerate(passages):
        if index:
            ids += _encode(tokenizer, PASSAGE_SEPARATOR)
        passage_ids = _encode(tokenizer, passage)
        if not passage_ids:
            raise ValueError(f"passage {index} is empty")
        spans += [len(ids), len(ids) + len(passage_ids)]
        ids += passage_ids
    ids += _encode(tokenizer, between + question + tail)
    return {"prompt": ids, "vllm_xargs": {CHUNKS_KEY: spans}}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []
