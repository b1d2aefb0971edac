"""RULER's scoring rules: is each expected answer contained in the output?"""

from __future__ import annotations

from collections.abc import Sequence


def string_match_all(output: str, references: Sequence[str]) -> float:
    """Share of `references` contained in `output` (case-insensitive)."""
    text = output.lower()
    return sum(reference.lower() in text for reference in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """1.0 if any of `references` is contained in `output` (case-insensitive), else 0.0."""
    text = output.lower()
    return float(any(reference.lower() in text for reference in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(output: str, references: Sequence[str], metric: str) -> float:
    return METRICS[metric](output, references)
