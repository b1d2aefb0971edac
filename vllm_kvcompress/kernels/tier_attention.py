"""Op: attention of a step's queries over the streams' second tiers, as a partial softmax.

Every second-tier row is older than the step's queries (tokens reach the tier only when a
compression moves them there), so each query sees all of its stream's rows: no causal
mask. The result is the tier's share of attention before normalisation with the full tier:
out = sum_t p_t v_t with p = softmax over the tier's logits, and lse = log sum_t exp(logit_t)
per query and query head. `paged_attention(..., prior=(out, lse))` folds it into the full
tier's softmax, so the two tiers are attended as one softmax. Rows are read through their
format's decode (kernels/low_bit.py, kernels/narrow_key.py); the Triton kernel reads
low-bit rows only, narrow-key rows take the torch version on any device.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.dispatch import use_triton
from vllm_kvcompress.kernels.low_bit import LowBitFormat
from vllm_kvcompress.kernels.narrow_key import NarrowKeyFormat

# Rows decoded at once by the torch version (streams x rows): bounds its float32 buffers.
DECODE_ROWS = 1 << 16


def tier_attention(query: torch.Tensor, row_pool: torch.Tensor,
                   fmt: LowBitFormat | NarrowKeyFormat, block_tables: torch.Tensor,
                   lengths: torch.Tensor, key_scales: torch.Tensor, request_slots: torch.Tensor,
                   query_start_loc: torch.Tensor, scale: float, impl: str | None = None,
                   max_query_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [tokens, Hq, D] float32, lse [tokens, Hq] float32); lse is -inf (and out 0) for
    queries whose stream has no second-tier rows.

    query:           [tokens, Hq, D], request-major
    row_pool:        [num_head_blocks, P, fmt.row_bytes] uint8, one layer's rows
    block_tables:    [S, H, max_blocks] int32 the second tiers' head-blocks
    lengths:         [S, H] int32 rows per stream
    key_scales:      [S, H, D] float32 how each stream stores its keys (second_tier.py)
    request_slots:   [R] int64; query_start_loc: [R + 1] int32
    max_query_len:   the longest query chunk, from the host (None: read from the device)
    """
    args = (query, row_pool, fmt, block_tables, lengths, key_scales, request_slots,
            query_start_loc, scale)
    if isinstance(fmt, LowBitFormat) and use_triton(query, impl):
        from vllm_kvcompress.kernels.low_bit_attention_triton import low_bit_attention_triton

        return low_bit_attention_triton(*args, max_query_len=max_query_len)
    return tier_attention_reference(*args)


def tier_attention_reference(query, row_pool, fmt, block_tables, lengths, key_scales,
                             request_slots, query_start_loc, scale):
    """Torch version of `tier_attention` (CPU path and Triton's test oracle). Decode
    requests (one query each) go in groups whose decoded rows stay under DECODE_ROWS; a
    prefill chunk decodes its streams once and attends QUERY_CHUNK queries at a time."""
    num_tokens, num_q_heads, head_dim = query.shape
    out = torch.zeros(num_tokens, num_q_heads, head_dim, device=query.device)
    lse = torch.full((num_tokens, num_q_heads), -torch.inf, device=query.device)
    stream_lens = lengths[request_slots].long()                                     # [R, H]
    longest = stream_lens.amax(dim=1).tolist() if len(request_slots) else []
    starts = query_start_loc.tolist()
    group: list[int] = []
    for r, most in enumerate(longest + [None]):
        single = most is not None and starts[r + 1] - starts[r] == 1
        if group and (not single or sum(longest[g] for g in group) + most > DECODE_ROWS):
            rows = torch.tensor([starts[g] for g in group], device=query.device)
            keys, values, live = _decode_streams(row_pool, fmt, block_tables, key_scales,
                                                 request_slots[group], stream_lens[group])
            group_out, group_lse = _attend(query[rows, None], keys, values, live, scale)
            out[rows], lse[rows] = group_out[:, 0], group_lse[:, 0]
            group = []
        if most is None or most == 0:
            continue
        if single:
            group.append(r)
            continue
        keys, values, live = _decode_streams(row_pool, fmt, block_tables, key_scales,
                                             request_slots[r:r + 1], stream_lens[r:r + 1])
        for begin in range(starts[r], starts[r + 1], QUERY_CHUNK):
            rows = slice(begin, min(begin + QUERY_CHUNK, starts[r + 1]))
            chunk_out, chunk_lse = _attend(query[None, rows], keys, values, live, scale)
            out[rows], lse[rows] = chunk_out[0], chunk_lse[0]
    return out, lse


# Queries of a prefill chunk attended at once: bounds the [H, G, chunk, A] logits.
QUERY_CHUNK = 256


def _decode_streams(row_pool, fmt, block_tables, key_scales, slots, stream_lens):
    """Keys, values [R, H, A, D] float32 and live [R, H, A] of R requests' low tiers."""
    per_block = row_pool.shape[1]
    column = torch.arange(int(stream_lens.max()), device=row_pool.device)
    blocks = block_tables[slots][..., column // per_block].long()                  # [R, H, A]
    live = column < stream_lens[..., None]
    rows = row_pool[torch.where(live, blocks, 0), column % per_block]              # [R, H, A, B]
    keys, values = fmt.decode(rows, key_scales[slots][:, :, None, :])
    return keys, values.masked_fill(~live[..., None], 0.0), live


def _logits(query, keys, scale):
    """query [R, Q, Hq, D], keys [R, H, A, D] -> logits [R, H, G, Q, A] float32 (G query
    heads per KV head)."""
    num_requests, num_queries, _, head_dim = query.shape
    queries = query.float().view(num_requests, num_queries, keys.shape[1], -1, head_dim)
    return torch.einsum("rqhgd,rhad->rhgqa", queries, keys) * scale


def _attend(query, keys, values, live, scale):
    """query [R, Q, Hq, D] over keys, values [R, H, A, D] -> out [R, Q, Hq, D], lse [R, Q, Hq]."""
    num_requests, num_queries, num_q_heads, head_dim = query.shape
    logits = _logits(query, keys, scale).masked_fill(~live[:, :, None, None, :], -torch.inf)
    lse = torch.logsumexp(logits, dim=-1)                                        # [R, H, G, Q]
    probs = torch.exp(logits - torch.where(lse > -torch.inf, lse, 0.0)[..., None])
    out = torch.einsum("rhgqa,rhad->rqhgd", probs, values)
    return (out.reshape(num_requests, num_queries, num_q_heads, head_dim),
            lse.permute(0, 3, 1, 2).reshape(num_requests, num_queries, num_q_heads))


def add_tier_scores(query: torch.Tensor, row_pool: torch.Tensor, fmt: NarrowKeyFormat,
                    block_tables: torch.Tensor, lengths: torch.Tensor, key_scales: torch.Tensor,
                    request_slots: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    lse: torch.Tensor) -> None:
    """Add to each second-tier row's score field its attention probability exp(logit - lse),
    summed over the queries and the group's heads (accumulated attention, as the full
    tier's scores get it). lse [tokens, Hq]: each query's log-sum-exp over everything it
    attended (paged_attention's lse_out). Arguments otherwise as `tier_attention`; torch
    on any device (used for narrow-key tiers under accumulated-attention policies)."""
    per_block = row_pool.shape[1]
    stream_lens = lengths[request_slots].long()
    starts = query_start_loc.tolist()
    score_bytes = slice(fmt.position_offset + 4, fmt.position_offset + 8)
    for r in range(len(request_slots)):
        if not int(stream_lens[r].max()):
            continue
        slot = request_slots[r:r + 1]
        keys, _, live = _decode_streams(row_pool, fmt, block_tables, key_scales, slot,
                                        stream_lens[r:r + 1])
        rows = slice(starts[r], starts[r + 1])
        logits = _logits(query[None, rows], keys, scale)
        row_lse = lse[rows].view(1, rows.stop - rows.start, keys.shape[1], -1).permute(0, 2, 3, 1)
        probs = torch.exp(logits - row_lse[..., None]).masked_fill(~live[:, :, None, None, :], 0.0)
        mass = probs.sum(dim=(2, 3))[0]                                              # [H, A]
        column = torch.arange(mass.shape[1], device=mass.device)
        blocks = block_tables[slot[0]][:, column // per_block].long()                # [H, A]
        blocks, offsets = blocks[live[0]], (column % per_block).expand_as(live[0])[live[0]]
        total = fmt.scores(row_pool[blocks, offsets]) + mass[live[0]]
        row_pool[blocks, offsets, score_bytes] = total.contiguous().view(torch.uint8).view(-1, 4)
