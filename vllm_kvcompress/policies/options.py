"""A policy's options (`kv_policy_args`): defaults, allowed values, one-line errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One entry of a policy's `kv_policy_args`: its default and the values it accepts."""

    default: Any
    allowed: str                    # the accepted values in words, for error messages
    check: Callable[[Any], bool]


def choice(default: Any, *values: Any) -> Option:
    return Option(default, "one of: " + ", ".join(map(str, values)), lambda v: v in values)


def integer(default: int | None, low: int, high: int | None = None, odd: bool = False,
            optional: bool = False) -> Option:
    words = ("an odd " if odd else "an ") + f"integer >= {low}"
    if high is not None:
        words += f" and <= {high}"
    return Option(default, words + (" (or null)" if optional else ""), lambda v: (
        (optional and v is None)
        or (isinstance(v, int) and not isinstance(v, bool) and v >= low
            and (high is None or v <= high) and (not odd or v % 2 == 1))))


def number(default: float | None, low: float, high: float | None = None,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> Option:
    words = f"a number {'>' if low_open else '>='} {low}"
    if high is not None:
        words += f" and {'<' if high_open else '<='} {high}"

    def check(v: Any) -> bool:
        if optional and v is None:
            return True
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    return Option(default, words + (" (or null)" if optional else ""), check)


def flag(default: bool) -> Option:
    return Option(default, "true or false", lambda v: isinstance(v, bool))


def file_path(default: str | None) -> Option:
    return Option(default, "a file path (string) or null",
                  lambda v: v is None or (isinstance(v, str) and bool(v)))


def layer_list(default: tuple[int, ...]) -> Option:
    return Option(default, "a list of layer indices (negative counts from the last layer)",
                  lambda v: isinstance(v, (list, tuple))
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


def share_matrix(default: None) -> Option:
    return Option(default, "a list per layer of positive numbers per KV head (equal lengths)",
                  lambda v: isinstance(v, list) and len(v) > 0
                  and all(isinstance(row, list) and len(row) == len(v[0]) > 0 for row in v)
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                          and math.isfinite(x) and x > 0 for row in v for x in row))


def resolve_options(policy: str, specs: dict[str, Option], options: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by `options`; ValueError naming a bad or unknown option."""
    unknown = sorted(set(options) - set(specs))
    if unknown:
        allowed = ", ".join(sorted(specs)) or "none"
        raise ValueError(f"kv_policy_args: unknown option {unknown[0]!r} for policy {policy!r}; "
                         f"allowed: {allowed}")
    for key, value in options.items():
        if not specs[key].check(value):
            raise ValueError(f"kv_policy_args.{key}={value!r}: must be {specs[key].allowed} "
                             f"(policy {policy!r})")
    return {key: options.get(key, spec.default) for key, spec in specs.items()}


def check_count(policy: str, what: str, value: Any) -> None:
    """A protected count (window, sinks): None or an integer >= 0."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what}={value!r}: must be an integer >= 0 (policy {policy!r})")
