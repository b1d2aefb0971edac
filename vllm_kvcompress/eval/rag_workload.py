"""A RAG-style workload that needs no download: passages cut from a long public text, each
holding one inserted fact, drawn with Zipf popularity, several per prompt in random order,
then a question about one fact of the prompt.

Prompts come from sharing.chunks.rag_prompt, so a passage has the same token ids wherever
it appears and its span is named as a chunk.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from vllm_kvcompress.eval.long_text import read_long_text
from vllm_kvcompress.eval.tasks.needle import NeedleShape, question, random_keys, random_value
from vllm_kvcompress.sharing.chunks import CHUNKS_KEY, rag_prompt, validate_chunks

TEMPLATE = ("Some special magic numbers are hidden within the following passages. Make sure "
            "to memorize them. I will quiz you about the numbers afterwards.\n\n"
            "{passages}\n\n{question}")


@dataclass
class RagRequest:
    """token_ids: the prompt; spans: its passages' [start, end); passages: their indices in
    the pool; reference: the asked fact's value."""

    token_ids: list[int]
    spans: list[tuple[int, int]]
    passages: list[int]
    reference: str


def passage_pool(tokenizer, size: int, passage_tokens: int,
                 rng: random.Random) -> list[tuple[str, str, str]]:
    """`size` (passage, key, value) triples: consecutive paragraphs of the long text, about
    `passage_tokens` tokens each, each with a fact inserted at a random sentence break."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", read_long_text()) if p.strip()]
    keys = random_keys(rng, size)
    pool, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        text = " ".join(current)
        if len(tokenizer(text, add_special_tokens=False).input_ids) < passage_tokens:
            continue
        sentences = re.split(r"(?<=[.;:]) ", text)
        value = random_value(rng, "number")
        sentences.insert(rng.randint(0, len(sentences)),
                         f"One of the special magic numbers for {keys[len(pool)]} is: {value}.")
        pool.append((" ".join(sentences), keys[len(pool)], value))
        current = []
        if len(pool) == size:
            return pool
    raise ValueError(f"the long text holds only {len(pool)} passages of {passage_tokens} tokens")


def rag_workload(tokenizer, num_requests: int, pool_size: int = 30, passage_tokens: int = 160,
                 per_prompt: tuple[int, int] = (4, 6), zipf: float = 1.0,
                 seed: int = 0) -> list[RagRequest]:
    """`num_requests` prompts over one pool; passage i is drawn with weight 1 / (i+1)^zipf."""
    rng = random.Random(seed)
    pool = passage_pool(tokenizer, pool_size, passage_tokens, rng)
    weights = [1 / (i + 1) ** zipf for i in range(pool_size)]
    requests = []
    for _ in range(num_requests):
        count = rng.randint(*per_prompt)
        chosen: list[int] = []
        while len(chosen) < count:
            index = rng.choices(range(pool_size), weights)[0]
            if index not in chosen:
                chosen.append(index)
        asked = rng.choice(chosen)
        fields = rag_prompt(tokenizer, [pool[i][0] for i in chosen],
                            question(NeedleShape(), [pool[asked][1]]), TEMPLATE)
        spans = validate_chunks(fields["vllm_xargs"][CHUNKS_KEY], len(fields["prompt"]))
        requests.append(RagRequest(fields["prompt"], spans,
                                   chosen, pool[asked][2]))
    return requests
