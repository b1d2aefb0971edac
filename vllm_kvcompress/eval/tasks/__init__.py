"""The synthetic tasks by name, and seeded sample generation over lengths and depths."""

from __future__ import annotations

import random
from collections.abc import Sequence

from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.tasks.common_words import COMMON_WORDS
from vllm_kvcompress.eval.tasks.kv_retrieval import KV_RETRIEVAL
from vllm_kvcompress.eval.tasks.needle import (
    NEEDLE_MULTIKEY, NEEDLE_MULTIQUERY, NEEDLE_MULTIVALUE, NEEDLE_SINGLE, NEEDLE_UUID,
)
from vllm_kvcompress.eval.tasks.passkey import PASSKEY
from vllm_kvcompress.eval.tasks.task import CountTokens, Task
from vllm_kvcompress.eval.tasks.variable_tracking import VARIABLE_TRACKING

TASKS: dict[str, Task] = {task.name: task for task in (
    PASSKEY, NEEDLE_SINGLE, NEEDLE_UUID, NEEDLE_MULTIKEY, NEEDLE_MULTIVALUE,
    NEEDLE_MULTIQUERY, VARIABLE_TRACKING, KV_RETRIEVAL, COMMON_WORDS,
)}


def sweep_depths(num_samples: int) -> list[float]:
    """Evenly spread depths, centred in equal bins: 5 samples -> 0.1, 0.3, ..., 0.9."""
    return [(i + 0.5) / num_samples for i in range(num_samples)]


def make_samples(task_names: Sequence[str], lengths: Sequence[int], num_samples: int,
                 seed: int, count_tokens: CountTokens) -> list[Sample]:
    """`num_samples` prompts per (task, length), depths swept; the same seed gives the
    same prompts on any machine (each sample has its own string-seeded generator)."""
    samples = []
    for name in task_names:
        task = TASKS[name]
        for length in lengths:
            for index, depth in enumerate(sweep_depths(num_samples)):
                rng = random.Random(f"{seed}/{name}/{length}/{index}")
                prompt, references, num_tokens = task.build(rng, length, depth, count_tokens)
                samples.append(Sample(
                    task=name, index=index, target_length=length, num_tokens=num_tokens,
                    depth=depth, prompt=prompt, references=references, metric=task.metric,
                    max_new_tokens=task.max_new_tokens,
                ))
    return samples
