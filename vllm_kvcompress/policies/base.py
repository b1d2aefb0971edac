"""The policy base class: a policy scores one layer's streams, the base selects within budget.

Flow of one compression (`Policy.compress`): protection (the recent window and the sinks,
from the average budget) -> score -> per-stream budgets (a budgets.BudgetAllocator) ->
select -> a Selection (selection.py), which `apply.apply_selection` (padded oracle) or the
paged cache (cache/compaction.py) turns into the compacted streams.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm_kvcompress.policies.budgets import make_allocator
from vllm_kvcompress.policies.options import (Option, check_count, choice, integer, layer_list,
                                              number, resolve_options, share_matrix)
from vllm_kvcompress.policies.ranking import protected_mask, top_k_with_protection
from vllm_kvcompress.policies.selection import SecondTier, Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch

# Allocator names a policy may offer through its `allocators` (budgets.make_allocator).
_ALLOCATOR_OPTIONS = {
    "alpha": (("adakv", "pyramid_adakv"), number(0.2, 0.0, 1.0)),
    "beta": (("pyramid", "pyramid_adakv"), integer(20, 1)),
    "full_layers": (("d2o",), layer_list((0, 1, -1))),
    "head_shares": (("profile",), share_matrix(None)),
}
# Every policy can take a learned budget profile (`vllm-kvcompress profile`) as allocator.
PROFILE = "profile"


class Policy:
    """Base class: a policy scores slots; the base selects the top slots within budget.

    Subclasses set the class attributes and override `score` (and `select` for merging or
    non-top-k rules). `window` and `sinks` are the protected recent and first tokens; a
    policy's published defaults live in its class attributes and are used when the user
    gave none (None). A default of None means "derived from the budget" (`protection`).

    The `needs_*` flags and `query_window` are read on the instance: composite policies
    (think, mikv) take them from their base policy.
    """

    name: ClassVar[str] = "base"
    # Which signals the caller must provide in the StreamBatch.
    needs_window_queries: ClassVar[bool] = False
    needs_accumulated: ClassVar[bool] = False
    needs_layer_densities: ClassVar[bool] = False
    # A trained scorer (scorers/) scores each slot when its K/V are written; the score is
    # kept in acc_scores instead of accumulated attention. None: the policy has none.
    write_scorer: Any = None
    default_window: ClassVar[int | None] = 32
    default_sinks: ClassVar[int | None] = 0
    # Budget allocators the policy accepts as `allocator:`; the first is its default (every
    # policy also accepts `profile`, a learned per-head profile).
    allocators: ClassVar[tuple[str, ...]] = ("uniform",)
    # The policy's own kv_policy_args (allocator options are added by option_specs).
    options_spec: ClassVar[dict[str, Option]] = {}
    # Where it keeps tokens in rows smaller than a full token (selection.py), or None;
    # read it through second_tier_for, which may depend on the budget.
    second_tier: SecondTier | None = None

    def __init__(self, window: int | None = None, sinks: int | None = None, **options: Any):
        check_count(self.name, "window", window)
        check_count(self.name, "sinks", sinks)
        self.window = self.default_window if window is None else window
        self.sinks = self.default_sinks if sinks is None else sinks
        self.options = resolve_options(self.name, self.option_specs(), options)
        self.allocator = make_allocator(self.options.get("allocator", self.allocators[0]),
                                        **{k: self.options[k] for k in _ALLOCATOR_OPTIONS
                                           if k in self.options})

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        """Every option the policy accepts: its own plus those of its allocators."""
        specs = dict(cls.options_spec)
        allocators = (*cls.allocators, PROFILE)
        specs["allocator"] = choice(allocators[0], *allocators)
        for key, (users, spec) in _ALLOCATOR_OPTIONS.items():
            if any(name in users for name in allocators):
                specs[key] = spec
        return specs

    @property
    def query_window(self) -> int:
        """Window queries W the caller must supply per query head (0 = none needed)."""
        return (self.window or 0) if self.needs_window_queries else 0

    def protection(self, budget: int | torch.Tensor) -> tuple[Any, Any]:
        """(window, sinks) protected for an average budget (int) or per-stream budgets
        ([N] int64, then the results may be [N] tensors)."""
        return self.window or 0, self.sinks or 0

    def score(self, batch: StreamBatch) -> torch.Tensor:
        """[N, T] float, higher = more worth keeping. Padding slots may hold anything."""
        raise NotImplementedError

    def allocate(self, batch: StreamBatch, budget: int, scores: torch.Tensor | None,
                 window: int, sinks: int) -> torch.Tensor:
        """[N] int64 per-stream budgets for an average `budget` (the policy's allocator)."""
        protected = protected_mask(batch, window, sinks)
        return self.allocator.allocate(batch, budget, window + sinks, scores, protected)

    def select(self, batch: StreamBatch, budgets: torch.Tensor, *,
               scores: torch.Tensor | None = None, window: Any = None,
               sinks: Any = None) -> Selection:
        """Keep sinks, the recent window, and the top-scored other slots up to `budgets`.

        budgets: [N] int64, slots each stream may keep (window and sinks included).
        scores: this batch's `score` when the caller already has it. window, sinks: the
        protection (ints or [N]); None = `protection(budgets)`.
        """
        scores = self.score(batch) if scores is None else scores
        window, sinks = self._resolve_protection(budgets, window, sinks)
        return Selection(keep=top_k_with_protection(scores, batch, budgets, window, sinks))

    def compress(self, batch: StreamBatch, budget: int) -> Selection:
        """Compress one layer's streams to an average `budget` slots per stream.

        budget counts the window and the sinks (C in policies.md). A stream whose length
        is within its allocated budget is left exactly as it is.
        """
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget={budget!r}: must be an integer >= 1")
        window, sinks = self.protection(budget)
        scores = self.score(batch)
        budgets = self.allocate(batch, budget, scores, window, sinks)
        return self.select(batch, budgets, scores=scores, window=window, sinks=sinks)

    def full_budget(self, budget: int) -> int:
        """Average tokens per stream kept at full precision when compressing to `budget`
        (less than the budget for policies that spend part of it on a second tier)."""
        return budget

    def second_tier_for(self, budget: int, head_size: int) -> SecondTier | None:
        """The second tier a request compressed to `budget` keeps tokens in (selection.py),
        for KV heads of head_size; None: it evicts what it does not keep."""
        return self.second_tier

    def max_layer_budget(self, budget: int, num_layers: int) -> int:
        """Upper bound, over layers, of a layer's mean slots kept at full precision per
        stream after compressing to `budget` (what the scheduler's page accounting may
        rely on). budgets.NO_LIMIT when some layer is left uncompressed (D2O's full layers)."""
        window, sinks = self.protection(budget)
        return self.allocator.max_layer_budget(self.full_budget(budget), window + sinks,
                                               num_layers)

    def _resolve_protection(self, budgets: torch.Tensor, window: Any, sinks: Any) -> tuple[Any, Any]:
        if window is None or sinks is None:
            default_window, default_sinks = self.protection(budgets)
            window = default_window if window is None else window
            sinks = default_sinks if sinks is None else sinks
        return window, sinks


# Token policies a channel or precision policy (think, mikv) may run on top of.
TOKEN_POLICIES = ("snapkv", "h2o", "streaming", "pyramidkv", "adakv", "ems", "kvmerger",
                  "d2o", "cam", "elastic")


class ComposedPolicy(Policy):
    """A policy on top of a token policy (`base:` option): the base decides which tokens
    survive; the subclass adds to its Selection. Options that are not the subclass's own
    go to the base policy, and so do window and sinks."""

    def __init__(self, window: int | None = None, sinks: int | None = None, **options: Any):
        from vllm_kvcompress.policies.registry import make_policy

        own = {k: v for k, v in options.items() if k in self.options_spec}
        rest = {k: v for k, v in options.items() if k not in self.options_spec}
        self.options = resolve_options(self.name, self.options_spec, own)
        try:
            self.base = make_policy(self.options["base"], window, sinks, **rest)
        except ValueError as error:
            raise ValueError(f"{error} [base of {self.name!r}, whose own options are: "
                             f"{', '.join(sorted(self.options_spec))}]") from None
        self.window, self.sinks, self.allocator = self.base.window, self.base.sinks, self.base.allocator
        self.needs_accumulated = self.base.needs_accumulated
        self.needs_layer_densities = self.base.needs_layer_densities

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        return dict(cls.options_spec)

    def protection(self, budget):
        return self.base.protection(budget)

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return self.base.score(batch)

    def allocate(self, batch, budget, scores, window, sinks):
        return self.base.allocate(batch, budget, scores, window, sinks)

    def max_layer_budget(self, budget: int, num_layers: int) -> int:
        return self.base.max_layer_budget(budget, num_layers)
