"""Teacher-forced check of compressed vs full KV on a long text.

The first `prefix` tokens are the prompt (prefilled once, compressed per the schedule);
the next tokens are fed one at a time, compressing every `interval` steps. Reported per
setting: perplexity of those tokens, and greedy agreement: the share of positions where
the model's top token equals the full-KV model's top token, and the KV bytes the streams
held at the end against full precision (eval/memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vllm_kvcompress.eval.reference_runner import ActivePolicy, ReferenceRunner
from vllm_kvcompress.eval.settings import Setting


@dataclass(frozen=True)
class PerplexityResult:
    setting: str
    policy: str
    budget: int | None
    perplexity: float
    agreement: float
    num_tokens: int
    kv_fraction: float


def perplexity_check(runner: ReferenceRunner, token_ids: Sequence[int], prefix: int,
                     settings: Sequence[Setting],
                     on_result: Callable[[PerplexityResult], None] = lambda result: None,
                     ) -> list[PerplexityResult]:
    """token_ids: the text; the first `prefix` are the prompt, the rest are scored.
    Dense is always measured (agreement is relative to it) and reported first;
    on_result sees each result as soon as it is measured."""
    actives = {setting.label: ActivePolicy.from_setting(setting)
               for setting in settings if not setting.dense}
    window = max((active.window for active in actives.values()), default=0)
    prefilled = runner.prefill(token_ids[:prefix], window)
    targets = list(token_ids[prefix:])
    dense = runner.teacher_force(prefilled, targets)
    results = [_result(Setting(), dense.nll, 1.0, 1.0)]
    on_result(results[0])
    for active in actives.values():
        scorer = active.policy.write_scorer
        start = prefilled if scorer is None else runner.prefill(token_ids[:prefix], window, scorer)
        forced = runner.teacher_force(start, targets, active)
        agreement = float((forced.argmax == dense.argmax).float().mean())
        memory = runner.memory(forced.state, active)
        results.append(_result(active.setting, forced.nll, agreement, memory.fraction))
        on_result(results[-1])
    return results


def _result(setting: Setting, nll, agreement: float, kv_fraction: float) -> PerplexityResult:
    return PerplexityResult(setting=setting.label, policy=setting.policy, budget=setting.budget,
                            perplexity=math.exp(float(nll.mean())), agreement=agreement,
                            num_tokens=len(nll), kv_fraction=kv_fraction)


def format_perplexity_table(results: Sequence[PerplexityResult]) -> str:
    lines = ["| setting | budget | KV bytes | perplexity | greedy agreement with dense | scored tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.setting} | {r.budget or '-'} | {100 * r.kv_fraction:.1f}% | {r.perplexity:.3f} "
              f"| {100 * r.agreement:.1f}% | {r.num_tokens} |" for r in results]
    return "\n".join(lines)
