"""Noise text with facts inserted at chosen depths (RULER-style haystack)."""

from __future__ import annotations

# Repetitive noise: it carries no information a model could confuse with the facts.
NOISE_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
    "There and back again.",
)


def noise_with_facts(num_sentences: int, facts: list[tuple[float, str]]) -> str:
    """`num_sentences` noise sentences with each (depth, fact) inserted at that depth.

    depth 0 puts the fact before all noise, 1 after it; facts at equal depth keep their order.
    """
    sentences = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(num_sentences)]
    by_slot: dict[int, list[str]] = {}
    for depth, fact in facts:
        by_slot.setdefault(round(depth * num_sentences), []).append(fact)
    pieces = []
    for slot in range(num_sentences + 1):
        pieces.extend(by_slot.get(slot, ()))
        if slot < num_sentences:
            pieces.append(sentences[slot])
    return " ".join(pieces)
