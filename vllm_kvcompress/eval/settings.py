"""A compression setting to evaluate: policy, budget and the finer knobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DENSE = "none"


@dataclass(frozen=True)
class Setting:
    """policy "none" is the uncompressed (dense) baseline and has no budget.

    window, sinks: None = the policy's defaults. interval: decode tokens between
    compressions (the plugin's --kv-interval). options: policy-specific arguments
    (the plugin's kv_policy_args).
    """

    policy: str = DENSE
    budget: int | None = None
    window: int | None = None
    sinks: int | None = None
    interval: int = 16
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def dense(self) -> bool:
        return self.policy == DENSE

    @property
    def label(self) -> str:
        return "dense" if self.dense else f"{self.policy}@{self.budget}"

    def plugin_settings(self) -> dict[str, Any]:
        """The plugin's setting names and values (for additional_config and vllm_xargs)."""
        if self.dense:
            return {"kv_policy": DENSE}
        values: dict[str, Any] = {"kv_policy": self.policy, "budget": self.budget,
                                  "kv_interval": self.interval}
        if self.window is not None:
            values["kv_window"] = self.window
        if self.sinks is not None:
            values["kv_sinks"] = self.sinks
        if self.options:
            values["kv_policy_args"] = dict(self.options)
        return values


def settings_grid(policies: Sequence[str], budgets: Sequence[int], window: int | None = None,
                  sinks: int | None = None, interval: int = 16,
                  options: dict[str, Any] | None = None) -> list[Setting]:
    """Dense once (if listed) plus every other policy at every budget."""
    grid = [Setting()] if DENSE in policies else []
    grid += [Setting(policy, budget, window, sinks, interval, dict(options or {}))
             for policy in policies if policy != DENSE for budget in budgets]
    return grid
