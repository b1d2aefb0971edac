"""What a task is: a seeded prompt builder plus how to score and how long to answer."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

CountTokens = Callable[[str], int]
# (rng, target_tokens, depth, count_tokens) -> (prompt, references, prompt_tokens)
BuildPrompt = Callable[[random.Random, int, float, CountTokens], tuple[str, tuple[str, ...], int]]


@dataclass(frozen=True)
class Task:
    """name: how the CLI and reports call it. metric: "all" or "part" (see scoring.py).
    max_new_tokens: enough for a correct answer and a little more."""

    name: str
    metric: str
    max_new_tokens: int
    build: BuildPrompt
