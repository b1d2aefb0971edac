"""Needle-in-a-haystack variants: "One of the special magic numbers for KEY is: VALUE."

Single (7-digit number or UUID), multi-key (distractor needles with other keys),
multi-value (several values for the asked key, all expected) and multi-query (several
keys asked at once, all expected). The first asked needle sits at the requested depth;
the other needles at seeded random depths.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from functools import partial

from vllm_kvcompress.eval.haystack import noise_with_facts
from vllm_kvcompress.eval.length_fit import largest_fitting
from vllm_kvcompress.eval.tasks.task import CountTokens, Task
from vllm_kvcompress.eval.words import ADJECTIVES, NOUNS


@dataclass(frozen=True)
class NeedleShape:
    """value_kind: "number" (7 digits) or "uuid". num_keys: needles' distinct keys
    (the asked ones included). num_values: values per key. num_queries: keys asked."""

    value_kind: str = "number"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def random_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct keys such as "quiet-lantern"."""
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def question(shape: NeedleShape, asked: list[str]) -> str:
    keys = " and ".join(asked)
    noun = f"special magic {shape.value_kind}"
    if shape.num_values == 1 and shape.num_queries == 1:
        return (f"What is the {noun} for {keys} mentioned in the provided text? "
                f"The {noun} for {keys} mentioned in the provided text is")
    return (f"What are all the {noun}s for {keys} mentioned in the provided text? "
            f"The {noun}s for {keys} mentioned in the provided text are")


def build_needle(shape: NeedleShape, rng: random.Random, target_tokens: int, depth: float,
                 count_tokens: CountTokens) -> tuple[str, tuple[str, ...], int]:
    keys = random_keys(rng, shape.num_keys)
    values = {key: [random_value(rng, shape.value_kind) for _ in range(shape.num_values)]
              for key in keys}
    asked = keys[:shape.num_queries]
    facts = [(depth if (key, i) == (asked[0], 0) else rng.random(),
              f"One of the special magic {shape.value_kind}s for {key} is: {value}.")
             for key in keys for i, value in enumerate(values[key])]
    intro = (f"Some special magic {shape.value_kind}s are hidden within the following text. "
             f"Make sure to memorize it. I will quiz you about the {shape.value_kind}s afterwards.")
    ending = question(shape, asked)

    def render(num_sentences: int) -> str:
        return f"{intro}\n\n{noise_with_facts(num_sentences, facts)}\n\n{ending}"

    prompt, num_tokens = largest_fitting(render, target_tokens, count_tokens, upper=target_tokens)
    references = tuple(value for key in asked for value in values[key])
    return prompt, references, num_tokens


def needle_task(name: str, shape: NeedleShape, max_new_tokens: int) -> Task:
    return Task(name=name, metric="all", max_new_tokens=max_new_tokens,
                build=partial(build_needle, shape))


NEEDLE_SINGLE = needle_task("needle_single", NeedleShape(), max_new_tokens=12)
NEEDLE_UUID = needle_task("needle_uuid", NeedleShape(value_kind="uuid"), max_new_tokens=48)
NEEDLE_MULTIKEY = needle_task("needle_multikey", NeedleShape(num_keys=4), max_new_tokens=12)
NEEDLE_MULTIVALUE = needle_task("needle_multivalue", NeedleShape(num_values=4), max_new_tokens=48)
NEEDLE_MULTIQUERY = needle_task("needle_multiquery", NeedleShape(num_keys=4, num_queries=2),
                                max_new_tokens=28)
