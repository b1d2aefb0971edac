"""Passkey retrieval: one number hidden in noise, asked for at the end."""

from __future__ import annotations

import random

from vllm_kvcompress.eval.haystack import noise_with_facts
from vllm_kvcompress.eval.length_fit import largest_fitting
from vllm_kvcompress.eval.tasks.task import CountTokens, Task

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
QUESTION = "What is the pass key?\nAnswer: The pass key is"


def build_passkey(rng: random.Random, target_tokens: int, depth: float,
                  count_tokens: CountTokens) -> tuple[str, tuple[str, ...], int]:
    passkey = str(rng.randint(10_000, 99_999))
    # Stated twice the same way: the 135M model echoes "the pass key" after "K is the pass key".
    fact = f"The pass key is {passkey}. Remember it. The pass key is {passkey}."

    def render(num_sentences: int) -> str:
        return f"{INTRO}\n\n{noise_with_facts(num_sentences, [(depth, fact)])}\n\n{QUESTION}"

    prompt, num_tokens = largest_fitting(render, target_tokens, count_tokens, upper=target_tokens)
    return prompt, (passkey,), num_tokens


PASSKEY = Task(name="passkey", metric="all", max_new_tokens=10, build=build_passkey)
