"""The policy interface: what a policy sees of one layer's streams, and what it returns.

A *stream* is one request's KV for one KV head of one layer. A policy gets a batch of
streams of ONE layer, padded to a common length T with per-stream lengths, and the batch is
request-major: stream n belongs to request n // num_kv_heads and KV head n % num_kv_heads,
so `x.view(R, H, ...)` groups the heads of a request (head-wise budgets need that).

Slots are in original token order: slot t < lengths[n] is live, slots beyond are padding
(their content is undefined, NaN included; every policy ignores them).

Flow of one compression (`Policy.compress`): protection (the recent window and the sinks,
from the average budget) -> score -> per-stream budgets (a budgets.BudgetAllocator) ->
select -> a Selection, which `apply.apply_selection` (padded oracle) or the paged cache
(cache/compaction.py) turns into the compacted streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass
class StreamBatch:
    """One layer's streams, padded.  N = R * H streams, T = padded length, D = head size.

    keys, values:     [N, T, D]  keys after RoPE, as stored in the cache
    lengths:          [N] int64  live slots per stream
    positions:        [N, T] int64  original token position of each slot (-1 in padding)
    acc_scores:       [N, T] float32  accumulated attention: for each slot, the sum over
                      every query that has attended it so far (prefill and decode) and over
                      the G query heads of the KV head's group, of the softmax probability.
                      Zeros when the caller does not track it (see Policy.needs_accumulated).
    window_queries:   [N, G, W, D] | None  the last W queries (after RoPE) of the G query
                      heads of each stream's group, oldest first; None when not asked for
                      (W >= Policy.query_window when Policy.needs_window_queries).
    window_positions: [N, W] int64 | None  token positions of those queries (-1 = absent,
                      when the request has fewer than W tokens).
    num_kv_heads:     H
    layer:            index of this layer, num_layers: how many layers the model has
    scale:            softmax scale of the attention (usually D ** -0.5)
    layer_densities:  [R, num_layers] float32 | None  D2O only (Policy.needs_layer_densities):
                      each request's attention density of every layer, from
                      budgets.attention_density on that layer's acc_scores at prefill.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    acc_scores: torch.Tensor
    num_kv_heads: int
    layer: int
    num_layers: int
    scale: float
    window_queries: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    layer_densities: torch.Tensor | None = None

    @property
    def num_streams(self) -> int:
        return self.keys.shape[0]

    @property
    def num_requests(self) -> int:
        return self.num_streams // self.num_kv_heads

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def live_mask(self) -> torch.Tensor:
        """[N, T] bool, True on live slots."""
        return slot_indices(self) < self.lengths[:, None]

    def require_window_queries(self, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(window_queries, window_positions), or a clear error when the caller gave none."""
        if self.window_queries is None or self.window_positions is None:
            raise ValueError(f"policy {policy!r} needs window_queries and window_positions "
                             "in the StreamBatch (Policy.needs_window_queries)")
        return self.window_queries, self.window_positions


@dataclass
class Selection:
    """What survives compression, per stream.  Shapes follow the StreamBatch: [N, T].

    Application order (apply.apply_selection is the executable definition):
    1. class merges (merge_into/weights), 2. value-only merges, 3. low precision,
    4. key-channel pruning, 5. compaction of the kept slots in original order.

    keep:        bool, the slots kept (as centres when merging). The kept count of a stream
                 never exceeds its budget.
    merge_into:  int64 | None. For a live slot that is not kept: the slot index (same
                 stream) of the kept slot it merges into, or -1 when it is simply evicted
                 (the "zero class"). Kept slots hold their own index. None = pure eviction.
    weights:     float32 | None (None = all ones). Merge weights of every slot, centres
                 included, >= 0. A kept slot c with at least one member becomes
                     sum_{i in class(c)} w_i * x_i / sum_{i in class(c)} w_i
                 for x = key and value, where class(c) = {c} + {i : merge_into[i] == c};
                 if those weights sum to 0 it stays as it was. With normalize_merges=False
                 (D2O) the division is skipped: c becomes sum_{i in class(c)} w_i * x_i
                 (the policy folds its own normaliser into the weights). A centre without
                 members is never rewritten. Its acc_score becomes the plain sum of its
                 class's acc_scores; its position stays its own.
    normalize_merges: see weights.
    value_merge_into: int64 [N, T, M] | None. Value-only merges (CaM: keys untouched):
                 up to M kept target slots per source slot, -1 = none. After step 1, each
                 kept target j gets  v_j += sum_{(i, m): value_merge_into[i, m] == j}
                 value_merge_weights[i, m] * v_i, with v_i the source's value before any
                 merge; entries naming a slot that is not kept are ignored. Keys and
                 acc_scores are unchanged.
    value_merge_weights: float32 [N, T, M] | None, paired with value_merge_into.
    key_channel_mask: bool [N, D] | None. ThinK: key channels kept (False = pruned). The
                 pruned channels of the slots in key_pruned_slots are zeroed in the stored
                 key (so q.k ignores them without masking q).
    key_pruned_slots: bool [N, T] | None. The kept slots whose key is channel-pruned (ThinK
                 keeps the most recent tokens at full width); None = every kept slot.
    low_precision: bool [N, T] | None. MiKV: kept slots stored at `quant_bits` bits; their
                 key and value (after merging) are replaced by the quantized-dequantized
                 version (apply.fake_quantize: per token, asymmetric, round to nearest).
                 The key is quantized as k * key_channel_scale and divided back.
    quant_bits:  bits of the low-precision slots (2..8), used with low_precision.
    key_channel_scale: float32 [N, D] | None. MiKV outlier balancing factors b_c (None =
                 1): a packed store keeps k_c * b_c and multiplies q_c by 1 / b_c.
    """

    keep: torch.Tensor
    merge_into: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    normalize_merges: bool = True
    value_merge_into: torch.Tensor | None = None
    value_merge_weights: torch.Tensor | None = None
    key_channel_mask: torch.Tensor | None = None
    key_pruned_slots: torch.Tensor | None = None
    low_precision: torch.Tensor | None = None
    quant_bits: int = 0
    key_channel_scale: torch.Tensor | None = None

    def kept_counts(self) -> torch.Tensor:
        """[N] int64, slots kept per stream."""
        return self.keep.sum(dim=1)


# ---------------------------------------------------------------------------- options

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


def layer_list(default: tuple[int, ...]) -> Option:
    return Option(default, "a list of layer indices (negative counts from the last layer)",
                  lambda v: isinstance(v, (list, tuple))
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in v))


# Allocator names a policy may offer through its `allocators` (budgets.make_allocator).
_ALLOCATOR_OPTIONS = {
    "alpha": (("adakv", "pyramid_adakv"), number(0.2, 0.0, 1.0)),
    "beta": (("pyramid", "pyramid_adakv"), integer(20, 1)),
    "full_layers": (("d2o",), layer_list((0, 1, -1))),
}


def _check_count(policy: str, what: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ValueError(f"{what}={value!r}: must be an integer >= 0 (policy {policy!r})")


# ---------------------------------------------------------------------------- policies

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
    default_window: ClassVar[int | None] = 32
    default_sinks: ClassVar[int | None] = 0
    # Budget allocators the policy accepts as `allocator:`; the first is its default.
    allocators: ClassVar[tuple[str, ...]] = ("uniform",)
    # The policy's own kv_policy_args (allocator options are added by option_specs).
    options_spec: ClassVar[dict[str, Option]] = {}

    def __init__(self, window: int | None = None, sinks: int | None = None, **options: Any):
        _check_count(self.name, "window", window)
        _check_count(self.name, "sinks", sinks)
        self.window = self.default_window if window is None else window
        self.sinks = self.default_sinks if sinks is None else sinks
        self.options = resolve_options(self.name, self.option_specs(), options)
        # budgets imports this module, so it is imported here rather than at the top.
        from vllm_kvcompress.policies.budgets import make_allocator

        self.allocator = make_allocator(self.options.get("allocator", self.allocators[0]),
                                        **{k: self.options[k] for k in _ALLOCATOR_OPTIONS
                                           if k in self.options})

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        """Every option the policy accepts: its own plus those of its allocators."""
        specs = dict(cls.options_spec)
        if len(cls.allocators) > 1:
            specs["allocator"] = choice(cls.allocators[0], *cls.allocators)
        for key, (users, spec) in _ALLOCATOR_OPTIONS.items():
            if any(name in users for name in cls.allocators):
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

    def max_layer_budget(self, budget: int, num_layers: int) -> int:
        """Upper bound, over layers, of a layer's mean kept slots per stream after
        compressing to `budget` (what the scheduler's page accounting may rely on).
        budgets.NO_LIMIT when some layer is left uncompressed (D2O's full layers)."""
        window, sinks = self.protection(budget)
        return self.allocator.max_layer_budget(budget, window + sinks, num_layers)

    def _resolve_protection(self, budgets: torch.Tensor, window: Any, sinks: Any) -> tuple[Any, Any]:
        if window is None or sinks is None:
            default_window, default_sinks = self.protection(budgets)
            window = default_window if window is None else window
            sinks = default_sinks if sinks is None else sinks
        return window, sinks


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


def budget_share(budget: int | torch.Tensor, share: float) -> int | torch.Tensor:
    """floor(budget * share), for an int or an [N] tensor of budgets."""
    if isinstance(budget, torch.Tensor):
        return torch.floor(budget.double() * share).long()
    return math.floor(budget * share)


# ---------------------------------------------------------------------------- selection

def slot_indices(batch: StreamBatch) -> torch.Tensor:
    """[1, T] int64 slot indices, broadcastable over streams."""
    return torch.arange(batch.max_len, device=batch.lengths.device)[None, :]


def _column(value: Any) -> Any:
    """An int as is, an [N] tensor as [N, 1] (to broadcast against [N, T])."""
    return value[:, None] if isinstance(value, torch.Tensor) else value


def protected_mask(batch: StreamBatch, window: Any, sinks: Any) -> torch.Tensor:
    """[N, T] bool: the first `sinks` and the last `window` live slots of each stream.

    window, sinks: ints, or [N] int64 per stream.
    """
    slots = slot_indices(batch)
    lengths = batch.lengths[:, None]
    live = slots < lengths
    return live & ((slots < _column(sinks)) | (slots >= lengths - _column(window)))


def descending_ranks(scores: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """[..., T] int64 rank of each slot along the last dim when ordered by class
    (descending), then score (descending, NaN last), then slot index (ascending).

    The order among slots of one class never depends on slots of other classes, so
    padding (class 0) cannot change the ranks of live slots.
    """
    key = torch.nan_to_num(scores.float(), nan=-torch.inf)
    order = key.argsort(dim=-1, descending=True, stable=True)
    order = order.gather(-1, classes.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def select_ranked(scores: torch.Tensor, classes: torch.Tensor, budgets: Any) -> torch.Tensor:
    """[N, T] bool: the first `budgets` slots of each stream in `descending_ranks` order,
    never a slot of class 0. budgets: int or [N]."""
    return (descending_ranks(scores, classes) < _column(budgets)) & (classes > 0)


def top_k_with_protection(scores: torch.Tensor, batch: StreamBatch, budgets: Any,
                          window: Any, sinks: Any) -> torch.Tensor:
    """[N, T] bool keep-mask: protected slots first, then the highest `scores`.

    Streams whose length is within budget keep everything. If the protected slots alone
    exceed a budget, the most recent protected slots win (the window is kept before sinks).
    Ties between equal scores go to the earlier slot.
    """
    live = batch.live_mask()
    protected = protected_mask(batch, window, sinks)
    slots = slot_indices(batch).expand_as(live)
    # Protected slots rank by recency, the others by score; then by class.
    key = torch.where(protected, slots.float(), scores.float())
    classes = 2 * protected.long() + live.long()
    return select_ranked(key, classes, budgets)


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
