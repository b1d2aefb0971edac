"""A compression setting to evaluate: policy, budget and the finer knobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_kvcompress.eval.memory import KVShape

DENSE = "none"


@dataclass(frozen=True)
class Setting:
    """policy "none" is the uncompressed (dense) baseline and has no budget.

    window, sinks: None = the policy's defaults. interval: decode tokens between
    compressions (the plugin's --kv-interval). options: policy-specific arguments
    (the plugin's kv_policy_args). memory_fraction: instead of a fixed budget, the budget
    whose KV bytes are this share of full precision at each prompt's length (`at_length`).
    quality: instead of a fixed budget, a kv_quality target read from retention `curves`
    (sent to a server as kv_quality, which reads its own curves).
    """

    policy: str = DENSE
    budget: int | None = None
    window: int | None = None
    sinks: int | None = None
    interval: int = 16
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    memory_fraction: float | None = None
    quality: float | None = None
    curves: dict[str, list[float]] | None = field(default=None, hash=False, compare=False)

    @property
    def dense(self) -> bool:
        return self.policy == DENSE

    @property
    def label(self) -> str:
        if self.dense:
            return "dense"
        name = self.policy
        if self.options:
            name += "[" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())) + "]"
        if self.memory_fraction is not None:
            return f"{name}@{100 * self.memory_fraction:g}%"
        if self.quality is not None:
            return f"{name}@q{self.quality:g}"
        return f"{name}@{self.budget}"

    @property
    def per_length(self) -> bool:
        """Whether the budget depends on the prompt's length (`at_length`)."""
        return self.memory_fraction is not None or self.quality is not None

    def at_length(self, num_tokens: int, shape: KVShape) -> Setting:
        """This setting with the budget for a prompt of `num_tokens` tokens: the one holding
        `memory_fraction` of the full KV bytes (eval/memory.py), or the one its `quality`
        target gives (policies/quality_budget.py); itself when it has a fixed budget."""
        if self.dense or not self.per_length:
            return self
        from vllm_kvcompress.eval.memory import budget_for_memory
        from vllm_kvcompress.policies.quality_budget import budget_for_quality
        from vllm_kvcompress.policies.registry import make_policy

        if self.quality is not None:
            return replace(self, budget=budget_for_quality(self.curves, self.policy,
                                                           self.quality, num_tokens))

        policy = make_policy(self.policy, self.window, self.sinks, **self.options)
        return replace(self, budget=budget_for_memory(policy, self.memory_fraction, num_tokens,
                                                      shape))

    def plugin_settings(self) -> dict[str, Any]:
        """The plugin's setting names and values (for additional_config and vllm_xargs)."""
        if self.dense:
            return {"kv_policy": DENSE}
        values: dict[str, Any] = {"kv_policy": self.policy, "kv_interval": self.interval}
        if self.quality is not None:  # the curves are a server setting, never a request's
            values.update(kv_quality=self.quality, kv_quality_curves=self.curves)
        else:
            values["budget"] = self.budget
        if self.window is not None:
            values["kv_window"] = self.window
        if self.sinks is not None:
            values["kv_sinks"] = self.sinks
        if self.options:
            values["kv_policy_args"] = dict(self.options)
        return values


def settings_grid(policies: Sequence[str | tuple[str, dict[str, Any]]], budgets: Sequence[int],
                  window: int | None = None, sinks: int | None = None, interval: int = 16,
                  options: dict[str, Any] | None = None,
                  memory_fractions: Sequence[float] = (), qualities: Sequence[float] = (),
                  curves: dict[str, list[float]] | None = None) -> list[Setting]:
    """Dense once (if listed) plus every other policy at every budget, or at every memory
    fraction or quality target when some are given (targets read `curves`). A policy may
    come with its own options, (name, options),
    which override the shared `options`."""
    specs = [(p, {}) if isinstance(p, str) else p for p in policies]
    grid = [Setting()] if any(name == DENSE for name, _ in specs) else []
    sizes = [dict(budget=b) for b in budgets]
    if memory_fractions:
        sizes = [dict(memory_fraction=f) for f in memory_fractions]
    elif qualities:
        sizes = [dict(quality=q, curves=curves) for q in qualities]
    grid += [Setting(name, window=window, sinks=sinks, interval=interval,
                     options={**(options or {}), **own}, **size)
             for name, own in specs if name != DENSE for size in sizes]
    return grid
