"""Budget allocators: how an average budget C is split over one layer's streams.

An allocator turns (batch of one layer, average budget C, reserved slots P = window + sinks
per stream, scores, protected mask) into per-stream budgets [N] (window and sinks included).
Promises the scheduler's page accounting relies on (`max_layer_budget`):
- uniform: every stream gets C.
- pyramid: every stream of layer l gets at most max_layer_budget(C, P, num_layers).
- adakv: the budgets of a request's H streams in a layer sum to H times the layer-level
  budget (C, or pyramid's); single heads may get more or less.
- d2o: layer budgets from attention densities; layers kept full are unbounded (NO_LIMIT).
- profile: stream (layer l, KV head h) gets its learned share of C, and at least C or its
  length (a budget covering the context changes nothing); at most the largest share's.
A stream's budget may exceed its length; it then keeps everything.
"""

from __future__ import annotations

import math
import sys
from typing import ClassVar

import torch

from vllm_kvcompress.policies.ranking import descending_ranks
from vllm_kvcompress.policies.stream_batch import StreamBatch

# max_layer_budget of an allocator that leaves some layer uncompressed: the scheduler's
# min(num_tokens, bound) then accounts for the whole context.
NO_LIMIT = sys.maxsize


def budget_share(budget: int | torch.Tensor, share: float) -> int | torch.Tensor:
    """floor(budget * share), for an int or an [N] tensor of budgets."""
    if isinstance(budget, torch.Tensor):
        return torch.floor(budget.double() * share).long()
    return math.floor(budget * share)


class BudgetAllocator:
    """Per-stream budgets for one layer's streams from an average budget."""

    name: ClassVar[str] = "base"
    # Whether allocate() reads the policy's scores (else they may be None).
    needs_scores: ClassVar[bool] = False

    def allocate(self, batch: StreamBatch, budget: int, reserved: int,
                 scores: torch.Tensor | None = None,
                 protected: torch.Tensor | None = None) -> torch.Tensor:
        """[N] int64 budgets. reserved: window + sinks; scores [N, T]; protected [N, T] bool."""
        raise NotImplementedError

    def max_layer_budget(self, budget: int, reserved: int, num_layers: int) -> int:
        """Upper bound over layers of a layer's mean budget per stream."""
        return budget


class UniformAllocator(BudgetAllocator):
    name = "uniform"

    def allocate(self, batch, budget, reserved, scores=None, protected=None):
        return torch.full((batch.num_streams,), budget, dtype=torch.long, device=batch.lengths.device)


class PyramidAllocator(BudgetAllocator):
    """PyramidKV (Cai et al., 2024): more budget in low layers, the window in every layer."""

    name = "pyramid"

    def __init__(self, beta: int = 20):
        self.beta = beta

    def allocate(self, batch, budget, reserved, scores=None, protected=None):
        return pyramid_budgets(budget, reserved, batch.layer, batch.num_layers, batch.lengths, self.beta)

    def max_layer_budget(self, budget, reserved, num_layers):
        return max_layer_budget(budget, reserved, num_layers, self.beta)


class AdaKVAllocator(BudgetAllocator):
    """Ada-KV (Feng et al., 2024): head-wise budgets inside each request and layer, on top
    of a layer-level allocator (uniform, or pyramid for pyramid_adakv)."""

    name = "adakv"
    needs_scores = True

    def __init__(self, layer_allocator: BudgetAllocator, alpha: float = 0.2):
        self.layer_allocator = layer_allocator
        self.alpha = alpha

    def allocate(self, batch, budget, reserved, scores=None, protected=None):
        if scores is None or protected is None:
            raise ValueError("the adakv allocator needs the policy's scores and protected slots")
        layer_budgets = self.layer_allocator.allocate(batch, budget, reserved)
        pools = (layer_budgets - reserved).clamp(min=0)
        candidates = batch.live_mask() & ~protected
        shares = adakv_budgets(scores, candidates, pools, batch.num_kv_heads, self.alpha)
        return layer_budgets - pools + shares

    def max_layer_budget(self, budget, reserved, num_layers):
        return self.layer_allocator.max_layer_budget(budget, reserved, num_layers)


class D2OAllocator(BudgetAllocator):
    """D2O (Wan et al., 2024): layer budgets from attention density; `full_layers` are not
    compressed at all."""

    name = "d2o"

    def __init__(self, full_layers: tuple[int, ...] = (0, 1, -1)):
        self.full_layers = tuple(full_layers)

    def allocate(self, batch, budget, reserved, scores=None, protected=None):
        if batch.layer_densities is None:
            raise ValueError("the d2o allocator needs StreamBatch.layer_densities "
                             "(budgets.attention_density of every layer at prefill)")
        compressed = compressed_layers(batch.num_layers, self.full_layers)
        shares = d2o_layer_shares(batch.layer_densities, compressed)[:, batch.layer]     # [R]
        lengths = batch.lengths
        if not compressed[batch.layer]:
            return lengths.clone()
        return d2o_budgets(shares.repeat_interleave(batch.num_kv_heads), budget, lengths)

    def max_layer_budget(self, budget, reserved, num_layers):
        compressed = compressed_layers(num_layers, self.full_layers)
        if not all(compressed):
            return NO_LIMIT
        # A layer's share of softmax(-v) * num_layers is below num_layers.
        return budget * num_layers


class ProfileAllocator(BudgetAllocator):
    """A learned budget profile (`vllm-kvcompress profile`): stream (l, h) keeps
    reserved + floor(share[l][h] * (C - reserved)); the shares average 1 over the model,
    so a request keeps about what `uniform` keeps, placed where the heads need it. A
    stream within C keeps everything, as under `uniform`."""

    name = "profile"

    def __init__(self, head_shares: list[list[float]]):
        self.shares = torch.tensor(head_shares, dtype=torch.float64)              # [L, H]

    def allocate(self, batch, budget, reserved, scores=None, protected=None):
        heads = slice(batch.first_head, batch.first_head + batch.num_kv_heads)
        if self.shares.shape[0] != batch.num_layers or heads.stop > self.shares.shape[1]:
            raise ValueError(f"head_shares is {list(self.shares.shape)} (layers x KV heads); the "
                             f"model has {batch.num_layers} layers and KV heads {heads.start}..{heads.stop - 1} here")
        shares = self.shares[batch.layer, heads].repeat(batch.num_requests).to(batch.lengths.device)
        shared = reserved + torch.floor(shares * max(budget - reserved, 0)).long()
        within = batch.lengths <= budget
        return torch.where(within, torch.maximum(shared, batch.lengths), shared)

    def max_layer_budget(self, budget, reserved, num_layers):
        # Any head's share bounds a layer's mean on every tensor-parallel rank.
        largest = reserved + math.floor(float(self.shares.max()) * max(budget - reserved, 0))
        return max(largest, budget)


def make_allocator(name: str, alpha: float = 0.2, beta: int = 20,
                   full_layers: tuple[int, ...] = (0, 1, -1),
                   head_shares: list[list[float]] | None = None) -> BudgetAllocator:
    """The allocator called `name`: uniform, pyramid, adakv, pyramid_adakv, d2o or profile."""
    if name == "uniform":
        return UniformAllocator()
    if name == "pyramid":
        return PyramidAllocator(beta)
    if name == "adakv":
        return AdaKVAllocator(UniformAllocator(), alpha)
    if name == "pyramid_adakv":
        return AdaKVAllocator(PyramidAllocator(beta), alpha)
    if name == "d2o":
        return D2OAllocator(tuple(full_layers))
    if name == "profile":
        if head_shares is None:
            raise ValueError("allocator=profile needs kv_policy_args.head_shares (write a profile "
                             "with `vllm-kvcompress profile` and pass it as --kv-config)")
        return ProfileAllocator(head_shares)
    raise ValueError(f"allocator={name!r}: must be one of: uniform, pyramid, adakv, pyramid_adakv, "
                     "d2o, profile")


# ---------------------------------------------------------------------------- PyramidKV

def max_layer_budget(avg_budget: int, window: int, num_layers: int, beta: int = 20) -> int:
    """Largest per-stream budget PyramidKV gives any layer (layer 0, before the clip to
    the sequence length, which only lowers it): window + 2(C - W) - floor((C - W) / beta)."""
    pool = avg_budget - window
    if pool <= 0 or num_layers == 1:
        return avg_budget
    return window + 2 * pool - pool // beta


def pyramid_budgets(avg_budget: int, window: int, layer: int, num_layers: int,
                    lengths: torch.Tensor, beta: int = 20) -> torch.Tensor:
    """[N] int64 PyramidKV budgets of `layer` for streams of `lengths` [N].

    min = floor((C-W)/beta), max = 2(C-W) - min; where max >= L - W it is clipped to L - W
    and min recomputed as 2(C-W) - max; step = floor((max-min)/(N_L-1));
    B_l = max - l*step, plus the window W (the published formula, including its floors, so
    the mean over layers may exceed C by up to (N_L-1)/2 slots).
    """
    pool = avg_budget - window
    if pool <= 0 or num_layers == 1:
        return torch.full_like(lengths, avg_budget)
    low = pool // beta
    high = torch.full_like(lengths, 2 * pool - low)
    clipped = high >= lengths - window
    high = torch.where(clipped, lengths - window, high)
    low = torch.where(clipped, 2 * pool - high, torch.full_like(lengths, low))
    step = torch.div(high - low, num_layers - 1, rounding_mode="floor")
    return high - layer * step + window


# ---------------------------------------------------------------------------- Ada-KV

def adakv_budgets(scores: torch.Tensor, candidates: torch.Tensor, pools: torch.Tensor,
                  num_kv_heads: int, alpha: float = 0.2) -> torch.Tensor:
    """[N] int64 head-wise shares of each request's pool of evictable slots.

    scores [N, T]; candidates [N, T] bool (live, unprotected slots); pools [N] int64: the
    layer-level share of each stream (budget minus its reserved slots). Per request
    (H consecutive streams): its pool P = sum of the H pools goes to its top-P candidates
    over all heads; head h wins n_h; the safeguard blends x_h = (1-alpha) n_h + alpha B_h
    (B_h: the head's own pool) and rounds by largest remainder so sum_h x_h = P exactly
    (ties: lower head first). When a request's candidates all fit in P, every head gets
    exactly its candidates' count.
    """
    num_streams, max_len = scores.shape
    heads = num_kv_heads
    flat_candidates = candidates.reshape(-1, heads * max_len)
    classes = flat_candidates.long()
    ranks = descending_ranks(scores.reshape(-1, heads * max_len), classes)
    pool = pools.view(-1, heads).sum(dim=1)                                         # [R]
    winners = (ranks < pool[:, None]) & flat_candidates
    won = winners.view(-1, heads, max_len).sum(dim=2)                               # [R, H]
    blended = (1 - alpha) * won.double() + alpha * pools.view(-1, heads).double()
    floors = blended.floor().long()
    missing = (pool - floors.sum(dim=1)).clamp(min=0)                               # [R] < H
    extra = descending_ranks(blended - floors.double(), torch.ones_like(floors)) < missing[:, None]
    shares = floors + extra.long()
    available = candidates.view(-1, heads, max_len).sum(dim=2)
    fits = (available.sum(dim=1) <= pool)[:, None]
    return torch.where(fits, available, shares).view(num_streams)


# ---------------------------------------------------------------------------- D2O

def attention_density(acc_scores: torch.Tensor, lengths: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[R] float32 D2O's density statistic of one layer: per stream, the variance of its
    accumulated attention (column sums) over its live slots; averaged over the request's
    heads. acc_scores [N, T]; lengths [N]."""
    live = torch.arange(acc_scores.shape[1], device=acc_scores.device)[None, :] < lengths[:, None]
    count = live.sum(dim=1).clamp(min=1)
    values = torch.where(live, acc_scores.float(), 0.0)
    mean = values.sum(dim=1) / count
    variance = torch.where(live, (values - mean[:, None]) ** 2, 0.0).sum(dim=1) / count
    return variance.view(-1, num_kv_heads).mean(dim=1)


def compressed_layers(num_layers: int, full_layers: tuple[int, ...]) -> list[bool]:
    """Which layers D2O compresses (negative indices count from the last layer)."""
    full = {index % num_layers for index in full_layers if -num_layers <= index < num_layers}
    return [layer not in full for layer in range(num_layers)]


def d2o_layer_shares(densities: torch.Tensor, compressed: list[bool]) -> torch.Tensor:
    """[R, N_L] each layer's share of the average budget (mean 1 over compressed layers).

    densities [R, N_L] (attention_density per layer): min-max normalised over the
    compressed layers v, share = softmax(-v) * (number of compressed layers); layers left
    full get share 1 (unused).
    """
    mask = torch.tensor(compressed, device=densities.device)
    values = densities.float()
    low = torch.where(mask, values, torch.inf).amin(dim=1, keepdim=True)
    high = torch.where(mask, values, -torch.inf).amax(dim=1, keepdim=True)
    span = high - low
    normalised = torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1.0), 0.0)
    logits = torch.where(mask, -normalised, -torch.inf)
    shares = torch.softmax(logits, dim=1) * int(mask.sum())
    return torch.where(mask, shares, 1.0)


def d2o_budgets(shares: torch.Tensor, budget: int, lengths: torch.Tensor) -> torch.Tensor:
    """[N] int64 budgets from layer shares [N]: r = clamp(share * C / L, 0.01, 1),
    budget = floor(r * L), i.e. the paper's ratio rule with rho = C / L. A stream whose
    length is within C keeps everything."""
    lengths_f = lengths.double()
    ratio = (shares.double() * budget / lengths_f.clamp(min=1)).clamp(0.01, 1.0)
    budgets = torch.floor(ratio * lengths_f).long()
    return torch.where(lengths <= budget, lengths, budgets)
