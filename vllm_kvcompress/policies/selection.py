"""What a policy returns for one layer's streams: which slots survive, and how."""

from __future__ import annotations

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

    def survivors(self, ranks: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[N, A] bool: the candidates [N, A] the tier keeps: all, or the `cap` of highest
        rank [N, A] (ties: the earlier column)."""
        if self.cap is None:
            return candidates
        return select_ranked(ranks, candidates.long(), self.cap)


@dataclass
class Selection:
    """What survives compression, per stream.  Shapes follow the StreamBatch: [N, T].

    Application order (apply.apply_selection is the executable definition):
    1. class merges (merge_into/weights), 2. value-only merges, 3. key-channel pruning,
    4. compaction of the kept slots in original order. Demoted slots leave the batch for
    the stream's low-bit tier, quantized from their own key and value.

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
    key_channel_mask: bool [N, D] | None. ThinK: key channels kept (False = pruned). The
                 pruned channels of the slots in key_pruned_slots are zeroed in the stored
                 key (so q.k ignores them without masking q).
    key_pruned_slots: bool [N, T] | None. The kept slots whose key is channel-pruned (ThinK
                 keeps the most recent tokens at full width); None = every kept slot.
    demote:      bool [N, T] | None. Live slots that are neither kept nor merged away and
                 move to the stream's low-bit tier (`low_tier`), quantized once there.
    demote_scores: float32 [N, T] | None. The rank each demoted slot keeps in the low-bit
                 tier (its tokens of lowest rank go first past the tier's cap).
    low_tier:    LowBitTier | None, the tier `demote` fills.
    key_balance: float32 [N, D] | None. Outlier balancing of the low-bit keys, b_c > 0 per
                 stream and key channel: the tier stores k_c * b_c and reads it back
                 divided by b_c (q.k unchanged). None = 1. A stream's factors are fixed
                 by the first compaction that gives its tier any (later ones are ignored),
                 so every row of a tier is read back with the factors it was stored with.
    """

    keep: torch.Tensor
    merge_into: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    normalize_merges: bool = True
    value_merge_into: torch.Tensor | None = None
    value_merge_weights: torch.Tensor | None = None
    key_channel_mask: torch.Tensor | None = None
    key_pruned_slots: torch.Tensor | None = None
    demote: torch.Tensor | None = None
    demote_scores: torch.Tensor | None = None
    low_tier: LowBitTier | None = None
    key_balance: torch.Tensor | None = None

    def kept_counts(self) -> torch.Tensor:
        """[N] int64, slots kept per stream."""
        return self.keep.sum(dim=1)
