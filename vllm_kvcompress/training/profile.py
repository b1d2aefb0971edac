"""Learning a budget profile: how much of the budget each layer's KV heads need.

On examples of the training data (training/examples.py), each head's curve is the mean
share of its label mass (the largest attention later queries pay each token,
training/capture.py; sinks left out) its k most attended tokens hold. A budget B per head
on average is then spread to maximise the summed curves: every head's tokens are ranked by
their gain and the L * H * B best gains win (the curves are concave, so each head gets a
prefix). A head's share is its count over B, clipped to [MIN_SHARE, MAX_SHARE] and
renormalised to average 1: the `profile` allocator (policies/budgets.py) gives stream
(l, h) that share of every budget, so a request keeps what `uniform` keeps.

The same examples give each ranking's retention curve (the mass kept at a kept fraction of
the prompt), from which a quality target picks a request's budget (policies/quality_budget.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from vllm_kvcompress.policies.quality_budget import ORACLE
from vllm_kvcompress.scorers.trained_scorer import TrainedScorer
from vllm_kvcompress.training.examples import Example, make_example
from vllm_kvcompress.training.trainer import SINKS, FrozenModel

MIN_SHARE, MAX_SHARE = 0.25, 4.0
# Kept fractions of a prompt the retention curves are measured at.
FRACTIONS = (1 / 64, 1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)


def mass_curves(frozen: FrozenModel, examples: Sequence[Example], length: int,
                progress: Callable[[], None] | None = None) -> torch.Tensor:
    """[L, H, length] mean over examples of the share of each head's label mass that its
    k + 1 most attended tokens hold (examples need more than length + SINKS tokens)."""
    total = torch.zeros(frozen.shape.num_layers, frozen.shape.num_kv_heads, length,
                        dtype=torch.float64)
    for example in examples:
        capture = frozen.capture(None, example)
        for layer, labels in capture.labels.items():
            ordered = labels[SINKS:].double().sort(dim=0, descending=True).values
            total[layer] += (ordered.cumsum(0) / ordered.sum(0))[:length].T
        if progress is not None:
            progress()
    return total / max(len(examples), 1)


def shares_for_budget(curves: torch.Tensor, budget: int) -> torch.Tensor:
    """[L, H] budget shares averaging 1 (within [MIN_SHARE, MAX_SHARE]) that maximise the
    summed curves [L, H, K] at `budget` tokens per head on average."""
    gains = torch.diff(curves, dim=-1, prepend=torch.zeros_like(curves[..., :1]))
    chosen = gains.flatten().topk(min(gains[..., 0].numel() * budget, gains.numel())).indices
    counts = torch.zeros(gains.numel(), dtype=torch.float64)
    counts[chosen] = 1.0
    shares = counts.view_as(gains).sum(-1) / budget
    for _ in range(20):  # clipping moves the mean; a few rounds settle it
        shares = (shares / shares.mean()).clamp(MIN_SHARE, MAX_SHARE)
    return shares / shares.mean()


def retained_mass(frozen: FrozenModel, examples: Sequence[Example], shares: torch.Tensor,
                  budgets: Sequence[int]) -> dict[str, dict[int, float]]:
    """Mean share of the label mass (sinks excepted) kept when each head keeps its top
    budget by a ranking, with uniform budgets or the profile's (same total): rankings by
    the label itself (oracle) and by snapkv's score."""
    rows = {f"{rank}, {alloc}": {b: 0.0 for b in budgets}
            for rank in ("oracle", "snapkv") for alloc in ("uniform", "profile")}
    count = 0
    for example in examples:
        capture = frozen.capture(None, example, snapkv=True)
        for layer, labels in capture.labels.items():
            label = labels[SINKS:].double()
            for rank, score in (("oracle", label), ("snapkv", capture.snapkv[layer][SINKS:])):
                order = score.argsort(dim=0, descending=True)
                kept_mass = label.gather(0, order).cumsum(0) / label.sum(0)       # [r, H]
                for budget in budgets:
                    for alloc, per_head in (("uniform", torch.full_like(shares[layer], budget)),
                                            ("profile", shares[layer] * budget)):
                        k = per_head.long().clamp(1, label.shape[0]) - 1
                        rows[f"{rank}, {alloc}"][budget] += float(kept_mass.gather(0, k[None]).mean())
            count += 1
    return {name: {b: v / max(count, 1) for b, v in per.items()} for name, per in rows.items()}


def retention_curves(frozen: FrozenModel, examples: Sequence[Example],
                     scorers: dict[str, TrainedScorer],
                     fractions: Sequence[float] = FRACTIONS) -> dict[str, list[float]]:
    """{"fractions": fractions, ranking: [mean share of the label mass kept]} for the
    rankings oracle (the label), snapkv and each trained scorer (by its policy's name),
    each head keeping its top ceil(f * prompt) tokens (sinks excepted)."""
    features_of = next(iter(scorers.values()), None)  # every scorer reads the same features
    sums = {name: [0.0] * len(fractions) for name in (ORACLE, "snapkv", *scorers)}
    count = 0
    for example in examples:
        capture = frozen.capture(features_of, example, snapkv=True)
        for layer, labels in capture.labels.items():
            label = labels[SINKS:].double()
            rankings = {ORACLE: label, "snapkv": capture.snapkv[layer][SINKS:]}
            with torch.no_grad():
                rankings.update({name: scorer(layer, capture.features[layer])[SINKS:]
                                 for name, scorer in scorers.items()})
            for name, score in rankings.items():
                order = score.argsort(dim=0, descending=True)
                kept = (label.gather(0, order).cumsum(0) / label.sum(0)).mean(1)    # [T]
                for i, fraction in enumerate(fractions):
                    sums[name][i] += float(kept[math.ceil(fraction * len(kept)) - 1])
            count += 1
    curves = {name: [round(min(v / count, 1.0), 4) for v in values] for name, values in sums.items()}
    for curve in curves.values():  # rounding must not break monotonicity
        for i in range(1, len(curve)):
            curve[i] = max(curve[i], curve[i - 1])
    return {"fractions": [round(f, 6) for f in fractions], **curves}


def profile_examples(frozen: FrozenModel, count: int, seed: int, num_words: int) -> list[Example]:
    rng = random.Random(f"{seed}/profile")
    return [make_example(frozen.tokenizer, rng, num_words) for _ in range(count)]
