"""One evaluation prompt with its expected answers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A prompt of about `target_length` tokens (`num_tokens` exactly) and its references.

    depth: where the queried information sits in the context, 0 = start, 1 = end.
    metric: "all" (string_match_all: share of references found) or "part"
    (string_match_part: 1 if any reference is found).
    """

    task: str
    index: int
    target_length: int
    num_tokens: int
    depth: float
    prompt: str
    references: tuple[str, ...]
    metric: str
    max_new_tokens: int
