"""Op: attention of a step's queries over the streams' low-bit tiers, as a partial softmax.

Every low-bit row is older than the step's queries (tokens reach the tier only when a
compression demotes them), so each query sees all of its stream's rows: no causal mask.
The result is the tier's share of attention before normalisation with the full tier:
out = sum_t p_t v_t with p = softmax over the tier's logits, and lse = log sum_t exp(logit_t)
per query and query head. `paged_attention(..., prior=(out, lse))` folds it into the full
tier's softmax, so the two tiers are attended as one softmax.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.dispatch import use_triton
from vllm_kvcompress.kernels.low_bit import LowBitFormat

# Rows decoded at once by the torch version (streams x rows): bounds its float32 buffers.
DECODE_ROWS = 1 << 16


def low_bit_attention(query: torch.Tensor, row_pool: torch.Tensor, fmt: LowBitFormat,
                      block_tables: torch.Tensor, lengths: torch.Tensor,
                      key_balance: torch.Tensor, request_slots: torch.Tensor,
                      query_start_loc: torch.Tensor, scale: float,
                      impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [tokens, Hq, D] float32, lse [tokens, Hq] float32); lse is -inf (and out 0) for
    queries whose stream has no low-bit rows.

    query:           [tokens, Hq, D], request-major
    row_pool:        [num_head_blocks, P, fmt.row_bytes] uint8, one layer's rows
    block_tables:    [S, H, max_blocks] int32 the low tiers' head-blocks
    lengths:         [S, H] int32 rows per stream
    key_balance:     [S, H, D] float32 outlier balancing (keys read back divided by it;
                     0 is read as 1)
    request_slots:   [R] int64; query_start_loc: [R + 1] int32
    """
    args = (query, row_pool, fmt, block_tables, lengths, key_balance, request_slots,
            query_start_loc, scale)
    if use_triton(query, impl):
        from vllm_kvcompress.kernels.low_bit_attention_triton import low_bit_attention_triton

        return low_bit_attention_triton(*args)
    return low_bit_attention_reference(*args)


def low_bit_attention_reference(query, row_pool, fmt, block_tables, lengths, key_balance,
                                request_slots, query_start_loc, scale):
    """Torch version of `low_bit_attention` (CPU path and Triton's test oracle). Decode
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
            keys, values, live = _decode_streams(row_pool, fmt, block_tables, key_balance,
                                                 request_slots[group], stream_lens[group])
            group_out, group_lse = _attend(query[rows, None], keys, values, live, scale)
            out[rows], lse[rows] = group_out[:, 0], group_lse[:, 0]
            group = []
        if most is None or most == 0:
            continue
        if single:
            group.append(r)
            continue
        keys, values, live = _decode_streams(row_pool, fmt, block_tables, key_balance,
                                             request_slots[r:r + 1], stream_lens[r:r + 1])
        for begin in range(starts[r], starts[r + 1], QUERY_CHUNK):
            rows = slice(begin, min(begin + QUERY_CHUNK, starts[r + 1]))
            out[rows], lse[rows] = (x[0] for x in _attend(query[None, rows], keys, values, live, scale))
    return out, lse


# Queries of a prefill chunk attended at once: bounds the [H, G, chunk, A] logits.
QUERY_CHUNK = 256


def _decode_streams(row_pool, fmt, block_tables, key_balance, slots, stream_lens):
    """Keys, values [R, H, A, D] float32 and live [R, H, A] of R requests' low tiers."""
    per_block = row_pool.shape[1]
    column = torch.arange(int(stream_lens.max()), device=row_pool.device)
    blocks = block_tables[slots][..., column // per_block].long()                  # [R, H, A]
    live = column < stream_lens[..., None]
    rows = row_pool[torch.where(live, blocks, 0), column % per_block]              # [R, H, A, B]
    balance = key_balance[slots].float()
    keys, values = fmt.decode(rows, torch.where(balance > 0, balance, 1.0)[:, :, None, :])
    return keys, values.masked_fill(~live[..., None], 0.0), live


def _attend(query, keys, values, live, scale):
    """query [R, Q, Hq, D] over keys, values [R, H, A, D] -> out [R, Q, Hq, D], lse [R, Q, Hq]."""
    num_requests, num_queries, num_q_heads, head_dim = query.shape
    num_heads = keys.shape[1]
    queries = query.float().view(num_requests, num_queries, num_heads, -1, head_dim)
    logits = torch.einsum("rqhgd,rhad->rhgqa", queries, keys) * scale
    logits = logits.masked_fill(~live[:, :, None, None, :], -torch.inf)
    lse = torch.logsumexp(logits, dim=-1)                                        # [R, H, G, Q]
    probs = torch.exp(logits - torch.where(lse > -torch.inf, lse, 0.0)[..., None])
    out = torch.einsum("rhgqa,rhad->rqhgd", probs, values)
    return (out.reshape(num_requests, num_queries, num_q_heads, head_dim),
            lse.permute(0, 3, 1, 2).reshape(num_requests, num_queries, num_q_heads))
