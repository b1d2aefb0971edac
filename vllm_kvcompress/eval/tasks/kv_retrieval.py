"""Key-value retrieval: a JSON object of UUID pairs; give the value of one key.

The asked pair sits at the requested depth among the pairs.
"""

from __future__ import annotations

import json
import random
import uuid

from vllm_kvcompress.eval.length_fit import largest_fitting
from vllm_kvcompress.eval.tasks.task import CountTokens, Task

INTRO = "Extract the value corresponding to the specified key in the JSON object below."


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_kv_retrieval(rng: random.Random, target_tokens: int, depth: float,
                       count_tokens: CountTokens) -> tuple[str, tuple[str, ...], int]:
    # Enough pairs for any target (a pair is ~50 tokens); the fit uses a prefix of them.
    pool = [(random_uuid(rng), random_uuid(rng)) for _ in range(target_tokens // 20 + 1)]
    asked_key, asked_value = random_uuid(rng), random_uuid(rng)

    def render(num_pairs: int) -> str:
        pairs = pool[:num_pairs]
        pairs.insert(round(depth * num_pairs), (asked_key, asked_value))
        data = json.dumps(dict(pairs), indent=1)
        return (f"{INTRO}\n\nJSON data:\n{data}\n\nKey: \"{asked_key}\"\n"
                f"The value associated with the specified key is:")

    prompt, num_tokens = largest_fitting(render, target_tokens, count_tokens, upper=len(pool))
    return prompt, (asked_value,), num_tokens


KV_RETRIEVAL = Task(name="kv_retrieval", metric="all", max_new_tokens=48, build=build_kv_retrieval)
