"""Variable tracking: a chain "VAR B = VAR A" ... in noise; list every variable equal to a value.

The chain's first assignment (the value) sits at the requested depth, the following hops
at even steps between there and the end of the context.
"""

from __future__ import annotations

import random
import string

from vllm_kvcompress.eval.haystack import noise_with_facts
from vllm_kvcompress.eval.length_fit import largest_fitting
from vllm_kvcompress.eval.tasks.task import CountTokens, Task

NUM_VARIABLES = 5
INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def random_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def build_variable_tracking(rng: random.Random, target_tokens: int, depth: float,
                            count_tokens: CountTokens) -> tuple[str, tuple[str, ...], int]:
    names = random_names(rng, NUM_VARIABLES)
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, NUM_VARIABLES)]
    step = (1.0 - depth) / NUM_VARIABLES
    facts = [(depth + i * step, statement) for i, statement in enumerate(statements)]
    ending = (f"Question: Find all variables that are assigned the value {value} in the text "
              f"above. Answer: According to the chain(s) of variable assignment in the text "
              f"above, {NUM_VARIABLES} variables are assigned the value {value}, they are:")

    def render(num_sentences: int) -> str:
        return f"{INTRO}\n\n{noise_with_facts(num_sentences, facts)}\n\n{ending}"

    prompt, num_tokens = largest_fitting(render, target_tokens, count_tokens, upper=target_tokens)
    return prompt, tuple(names), num_tokens


VARIABLE_TRACKING = Task(name="variable_tracking", metric="all", max_new_tokens=30,
                         build=build_variable_tracking)
