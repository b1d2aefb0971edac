"""A budget from a quality target: the smallest budget whose predicted retention reaches
the target (`kv_quality`).

Retention curves come from `vllm-kvcompress profile` (training/profile.py): for kept
fractions f of a prompt, the share of the attention mass later queries pay that a
policy's ranking keeps, on held-out examples. A request of P prompt tokens with target q
gets budget ceil(f * P) for the smallest f whose retention reaches q (linear between grid
points), using its policy's curve, or the oracle's (the label's own ranking, an upper
bound) for a policy the profile has none for.
"""

from __future__ import annotations

import math

ORACLE = "oracle"


def check_curves(curves: dict) -> str | None:
    """What is wrong with retention curves, or None: a `fractions` list increasing in (0, 1]
    ending at 1, an `oracle` curve, every curve as long and non-decreasing in [0, 1]."""
    fractions = curves.get("fractions")
    if not isinstance(fractions, list) or not fractions or ORACLE not in curves:
        return "needs a 'fractions' list and an 'oracle' curve"
    if any(not 0 < a < b <= 1 for a, b in zip(fractions, fractions[1:])) or fractions[-1] != 1:
        return "'fractions' must increase within (0, 1] and end at 1"
    for name, curve in curves.items():
        if not isinstance(curve, list) or len(curve) != len(fractions):
            return f"curve {name!r} must be a list as long as 'fractions'"
        if name != "fractions" and any(not 0 <= a <= b <= 1 for a, b in zip(curve, curve[1:])):
            return f"curve {name!r} must be non-decreasing within [0, 1]"
    return None


def budget_for_quality(curves: dict, policy: str, quality: float, prompt_len: int) -> int:
    """Tokens per KV head (window and sinks included) a `policy` request of `prompt_len`
    tokens keeps for predicted retention `quality` in (0, 1]."""
    fractions, retained = curves["fractions"], curves.get(policy, curves[ORACLE])
    fraction = 1.0
    for i, value in enumerate(retained):
        if value >= quality:
            if i == 0 or value == retained[i - 1]:
                fraction = fractions[i]
            else:  # between grid points, linearly
                low, high = fractions[i - 1], fractions[i]
                fraction = low + (high - low) * (quality - retained[i - 1]) / (value - retained[i - 1])
            break
    return max(1, min(prompt_len, math.ceil(fraction * prompt_len)))
