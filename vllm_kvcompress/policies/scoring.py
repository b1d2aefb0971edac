"""Scoring signals, torch reference, batched over streams (N = R * H, padded to T).

Kernel versions (kernels/) keep these signatures. Conventions: keys [N, T, D] after RoPE;
slots t >= lengths[n] are padding and never read into a result (NaN there is harmless);
queries of the G query heads of a stream's group come as [N, G, Q, D] with token
positions [N, Q] (-1 = absent query, contributes nothing). A query at position p sees the
keys at positions <= p (causal by position: slots may have gaps after compression).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                    key_positions: torch.Tensor, query_positions: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """[N, G, Q, T] float32 softmax(q k^T * scale) over each stream's visible live keys;
    zero rows for absent queries and zero columns on padding. Materialises N*G*Q*T floats.

    queries [N, G, Q, D]; keys [N, T, D]; lengths [N]; key_positions [N, T];
    query_positions [N, Q].
    """
    live = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]
    visible = (live[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
               & (query_positions[:, :, None] >= 0))                                 # [N, Q, T]
    logits = torch.einsum("ngqd,ntd->ngqt", queries.float(), keys.float()) * scale
    logits = logits.masked_fill(~visible[:, None], -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    # A row with no visible key is all -inf: softmax gives NaN there.
    return torch.where(visible.any(dim=-1)[:, None, :, None], probs, 0.0)


def window_attention(window_queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor,
                     key_positions: torch.Tensor, query_positions: torch.Tensor, scale: float,
                     reduce: str = "mean") -> torch.Tensor:
    """[N, T] float32 observation-window scores (SnapKV): each key's probability summed
    over the W window queries, then aggregated over the G query heads of the group
    ("mean" or "max"; kernels.window_attention_scores returns the sum = G * mean).
    Zero on padding.

    window_queries [N, G, W, D]; keys [N, T, D]; lengths [N]; key_positions [N, T];
    query_positions [N, W].
    """
    per_head = attention_probs(window_queries, keys, lengths, key_positions, query_positions,
                               scale).sum(dim=2)                                     # [N, G, T]
    if reduce == "mean":
        return per_head.mean(dim=1)
    if reduce == "max":
        return per_head.amax(dim=1)
    raise ValueError(f"reduce={reduce!r}: must be one of: mean, max")


def accumulate_attention(acc_scores: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                         lengths: torch.Tensor, key_positions: torch.Tensor,
                         query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """[N, T] float32 acc_scores plus the probabilities the new queries give each key,
    summed over the queries and the G heads (H2O's column sums: one row per decode step,
    or a prefill chunk). Padding slots are returned unchanged.

    acc_scores [N, T]; queries [N, G, Q, D] (Q = 1 for a decode step); keys [N, T, D]
    (including the new tokens' keys); lengths [N]; key_positions [N, T]; query_positions [N, Q].
    """
    probs = attention_probs(queries, keys, lengths, key_positions, query_positions, scale)
    return acc_scores.float() + probs.sum(dim=(1, 2))


def global_local_score(global_scores: torch.Tensor, local_scores: torch.Tensor,
                       lengths: torch.Tensor, global_weight: float = 1.0) -> torch.Tensor:
    """[N, T] float32 EMS Global-Local score: max(w * s_glo * mean(s_loc) / mean(s_glo), s_loc)
    with w = global_weight.

    The global score (accumulated attention, [N, T]) is rescaled to the local one's mean
    (window attention, [N, T]) over each stream's live slots, which removes its scale and
    dampens the causal bias toward early tokens; a stream without global signal (all zero)
    uses the local score. Zero on padding.
    """
    live = torch.arange(global_scores.shape[1], device=global_scores.device)[None, :] < lengths[:, None]
    glo = torch.where(live, global_scores.float(), 0.0)
    loc = torch.where(live, local_scores.float(), 0.0)
    count = live.sum(dim=1, keepdim=True).clamp(min=1)
    mean_glo = glo.sum(dim=1, keepdim=True) / count
    mean_loc = loc.sum(dim=1, keepdim=True) / count
    factor = torch.where(mean_glo > 0, mean_loc / torch.where(mean_glo > 0, mean_glo, 1.0), 0.0)
    return torch.maximum(glo * (factor * global_weight), loc)


def pool_scores(scores: torch.Tensor, lengths: torch.Tensor, kernel: int, kind: str = "max") -> torch.Tensor:
    """[N, T] float32 1-D pooling of scores [N, T] along each stream's first lengths[n]
    slots: odd `kernel`, stride 1, same padding; as if each stream were pooled alone
    (avg: zero padding counted in the divisor, i.e. sum / kernel; max: padding ignored).
    Zero beyond lengths.
    """
    if kernel % 2 != 1:
        raise ValueError(f"kernel={kernel}: must be odd")
    live = torch.arange(scores.shape[1], device=scores.device)[None, :] < lengths[:, None]
    if kind == "max":
        x = torch.where(live, scores.float(), -torch.inf)[:, None, :]
        pooled = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)[:, 0]
    elif kind == "avg":
        x = torch.where(live, scores.float(), 0.0)[:, None, :]
        pooled = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=True)[:, 0]
    else:
        raise ValueError(f"kind={kind!r}: must be one of: avg, max")
    return torch.where(live, pooled, 0.0)


def most_similar_kept(keys: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the kept slot of the same stream whose key has the highest cosine
    similarity: (index [N, T] int64, cosine [N, T] float32); -1 and -inf where the stream
    keeps nothing. Ties go to the earlier kept slot.

    keys [N, T, D]; keep [N, T] bool (live slots only). Compares against the K = max kept
    count centres ([N, T, K] floats); sizing K costs one host sync.
    """
    num_streams, max_len, _ = keys.shape
    counts = keep.sum(dim=1)
    k = int(counts.max()) if num_streams else 0
    if k == 0:
        return (torch.full((num_streams, max_len), -1, dtype=torch.long, device=keys.device),
                torch.full((num_streams, max_len), -torch.inf, device=keys.device))
    # Kept slots first, in slot order: the first `counts` entries are the centres.
    centres = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]              # [N, K]
    unit = F.normalize(keys.float(), dim=-1)
    centre_unit = unit.gather(1, centres[..., None].expand(-1, -1, unit.shape[-1]))
    cosine = torch.einsum("ntd,nkd->ntk", unit, centre_unit)
    valid = torch.arange(k, device=keys.device)[None, None, :] < counts[:, None, None]
    cosine = torch.where(valid, torch.nan_to_num(cosine, nan=-torch.inf), -torch.inf)
    which = cosine.argmax(dim=2)                                                      # first max
    best = cosine.gather(2, which[..., None])[..., 0]
    index = torch.where(best > -torch.inf, centres.gather(1, which), -1)
    return index, best
