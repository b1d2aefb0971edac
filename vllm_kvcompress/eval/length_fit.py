"""Grow a prompt to a target length measured in the model's own tokens."""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(render: Callable[[int], str], target_tokens: int,
                    count_tokens: Callable[[str], int], upper: int) -> tuple[str, int]:
    """The prompt `render(k)` with the largest k in [0, upper] that fits in `target_tokens`.

    `render` must grow with k (more filler units, more pairs, more words). Returns the
    prompt and its token count. Binary search: ~log2(upper) tokenizations.
    """
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(render(middle)) <= target_tokens:
            low = middle
        else:
            high = middle - 1
    prompt = render(low)
    return prompt, count_tokens(prompt)
