"""What a policy returns for one layer's streams: which slots survive, and how; and the
second tier a policy may keep tokens in (rows smaller than a full token)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_kvcompress.policies.ranking import select_ranked


@dataclass(frozen=True)
class LowBitTier:
    """A stream's second tier: tokens kept at low precision instead of being evicted.

    Each token is quantized once, when it is demoted, per token and asymmetric (round to
    nearest, a step and a minimum per key and per value), keys at `key_bits`, values at
    `value_bits` (1..8). `cap`: most tokens the tier keeps per stream (None = no limit);
    past it, the tokens of lowest rank (their score when demoted) are evicted.
    """

    key_bits: int
    value_bits: int
    cap: int | None = None

    def row_bytes(self, head_size: int) -> int:
        """Bytes a token takes in this tier (kernels/low_bit.py's packed row): its codes,
        padded to 4 bytes, then a step and a minimum per key and value (float16), its
        position and its rank (4 bytes each)."""
        codes = (self.key_bits + self.value_bits) * head_size // 8
        return -(-codes // 4) * 4 + 16

    def survivors(self, ranks: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[N, A] bool: the candidates [N, A] the tier keeps: all, or the `cap` of highest
        rank [N, A] (ties: the earlier column)."""
        if self.cap is None:
            return candidates
        return select_ranked(ranks, candidates.long(), self.cap)


@dataclass(frozen=True)
class NarrowKeyTier:
    """A stream's second tier for kept tokens whose keys lost their pruned channels: the
    key on the stream's kept channels and the full value, in the model's dtype. Which
    channels are kept is fixed by the stream's first compaction that narrows a token
    (Selection.key_scales); floor(pruning_ratio * D) of the D are pruned."""

    pruning_ratio: float

    def kept_channels(self, head_size: int) -> int:
        return head_size - math.floor(self.pruning_ratio * head_size)


SecondTier = LowBitTier | NarrowKeyTier


@dataclass
class Selection:
    """What survives compression, per stream.  Shapes follow the StreamBatch: [N, T].

    Application order (apply.apply_selection is the executable definition):
    1. class merges (merge_into/weights), 2. value-only merges, 3. key-channel pruning of
    narrowed slots, 4. compaction of the kept slots in original order. Demoted slots leave
    the batch for the stream's low-bit tier, quantized from their own key and value.

    keep:        bool, the slots kept at full precision (as centres when merging). The kept
                 count of a stream never exceeds its budget.
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
    second_tier: LowBitTier | NarrowKeyTier | None: the tier `demote` or `narrow` fills.
    demote:      bool [N, T] | None. Live slots that are neither kept nor merged away and
                 move to the stream's low-bit tier, quantized once there.
    demote_scores: float32 [N, T] | None. The rank each demoted slot keeps in the low-bit
                 tier (its tokens of lowest rank go first past the tier's cap).
    narrow:      bool [N, T] | None. Kept slots stored in the narrow-key tier from now on:
                 their key's channels with key_scales 0 are pruned (read back as 0, so q.k
                 ignores them). Only the first compaction that narrows a stream's slots
                 does (it fixes the stream's scales); later ones keep its narrow slots
                 narrow and narrow no more.
    key_scales:  float32 [N, D] | None (None = 1). How the second tier stores each key
                 channel: k_c * s_c, read back divided by s_c; s_c = 0 prunes channel c
                 (narrow rows keep only the others). MiKV: outlier balancing s_c =
                 sqrt(max|q_c| / max|k_c|) (q.k unchanged); ThinK: 1 kept, 0 pruned. A
                 stream's scales are fixed by the first compaction that gives its tier
                 any, so every row is read back with the scales it was stored with.
    """

    keep: torch.Tensor
    merge_into: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    normalize_merges: bool = True
    value_merge_into: torch.Tensor | None = None
    value_merge_weights: torch.Tensor | None = None
    second_tier: LowBitTier | NarrowKeyTier | None = None
    demote: torch.Tensor | None = None
    demote_scores: torch.Tensor | None = None
    narrow: torch.Tensor | None = None
    key_scales: torch.Tensor | None = None

    def kept_counts(self) -> torch.Tensor:
        """[N] int64, slots kept per stream."""
        return self.keep.sum(dim=1)
