"""Common-words extraction: a numbered list where 10 words repeat often; name them.

The 10 common words make 30% of the entries; the other words fill the rest, cycling
through the remaining vocabulary. At 4k tokens that is ~30 repeats of each common word
against ~3 of each other word; at 512 tokens, ~4 against 1. There is no needle, so
`depth` does not apply.
"""

from __future__ import annotations

import random

from vllm_kvcompress.eval.length_fit import largest_fitting
from vllm_kvcompress.eval.tasks.task import CountTokens, Task
from vllm_kvcompress.eval.words import NOUNS

NUM_COMMON = 10
COMMON_SHARE = 0.3
INTRO = ("Below is a numbered list of words. In these words, some appear more often than "
         "others. Memorize the ones that appear most often.")
ENDING = (f"Question: What are the {NUM_COMMON} most common words in the above list? "
          f"Answer: The top {NUM_COMMON} words that appear most often in the list are:")


def build_common_words(rng: random.Random, target_tokens: int, depth: float,
                       count_tokens: CountTokens) -> tuple[str, tuple[str, ...], int]:
    vocabulary = list(NOUNS)
    rng.shuffle(vocabulary)
    common, rare = vocabulary[:NUM_COMMON], vocabulary[NUM_COMMON:]
    # An entry takes at least one token, so target_tokens entries always suffice.
    shuffle_keys = [rng.random() for _ in range(target_tokens)]

    def render(num_entries: int) -> str:
        repeats = max(1, int(num_entries * COMMON_SHARE / NUM_COMMON))
        entries = common * repeats
        entries += [rare[i % len(rare)] for i in range(max(0, num_entries - len(entries)))]
        order = sorted(range(len(entries)), key=shuffle_keys.__getitem__)
        listing = " ".join(f"{n}. {entries[i]}" for n, i in enumerate(order, start=1))
        return f"{INTRO}\n{listing}\n{ENDING}"

    prompt, num_tokens = largest_fitting(render, target_tokens, count_tokens, upper=target_tokens)
    return prompt, tuple(common), num_tokens


COMMON_WORDS = Task(name="common_words", metric="all", max_new_tokens=40, build=build_common_words)
