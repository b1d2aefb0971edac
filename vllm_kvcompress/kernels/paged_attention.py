"""Op: attention over per-head block tables, for decode steps and prefill chunks alike.

Each request r of the batch owns H streams (one per KV head) whose slots live in head-blocks
listed by its block-table row. This step's tokens of r were appended to every stream before
the call, so its q_len queries are the last q_len slots of each stream: query i sits at
stream index length - q_len + i and attends causally to the slots up to it (the stream's
compressed past plus the chunk so far). Query head qh reads KV head qh // G (GQA).

A `prior` is attention the queries already paid elsewhere, as a partial softmax (out, lse):
the low-bit tier's (low_bit_attention.py). It joins the same softmax: the result is
(exp(lse) * out + sum_t exp(logit_t) v_t) / (exp(lse) + sum_t exp(logit_t)), and emitted
scores are probabilities over both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_kvcompress.kernels.dispatch import use_triton


def paged_attention(query: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                    block_tables: torch.Tensor, lengths: torch.Tensor, request_slots: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    scores_pool: torch.Tensor | None = None, max_query_len: int | None = None,
                    impl: str | None = None,
                    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
                    lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [tokens, Hq, D] in the query's dtype.

    query:           [tokens, Hq, D], request-major (request r's queries are contiguous)
    key_pool:        [num_head_blocks, block_size, D] one layer's keys, any strides
    value_pool:      [num_head_blocks, block_size, D] one layer's values, any strides
    block_tables:    [S, H, max_blocks] int32 physical head-block ids, S = request slots
    lengths:         [S, H] int32 live slots per stream, this step's tokens included
    request_slots:   [R] int64 table row of each request in the batch
    query_start_loc: [R + 1] int32 request r's queries are query[qsl[r]:qsl[r + 1]]
    scores_pool:     [num_head_blocks, block_size] float32 or None; when given, every slot
                     a query attends gets its probability added, summed over the queries
                     and the G query heads of its group (accumulated attention)
    max_query_len:   largest q_len, if the caller knows it (else read from device: a sync)
    prior:           (out [tokens, Hq, D], lse [tokens, Hq]) float32 or None: a partial
                     softmax to join (lse -inf: nothing there)
    lse_out:         [tokens, Hq] float32 or None: filled with each query's log-sum-exp
                     over everything it attended (the prior included)
    """
    streams = (key_pool, value_pool, block_tables, lengths, request_slots, query_start_loc)
    if use_triton(query, impl):
        from vllm_kvcompress.kernels.paged_attention_triton import paged_attention_triton

        return paged_attention_triton(query, *streams, scale, scores_pool, max_query_len, prior,
                                      lse_out)
    return paged_attention_reference(query, *streams, scale, scores_pool, prior, lse_out)


def paged_attention_reference(query, key_pool, value_pool, block_tables, lengths,
                              request_slots, query_start_loc, scale,
                              scores_pool=None, prior=None, lse_out=None) -> torch.Tensor:
    """Torch version of `paged_attention` (CPU path and Triton's test oracle).

    Decode requests (one query each) are padded into one batch; each prefill chunk is
    attended on its own in query chunks, so memory stays bounded for long prompts.
    Sizes are read off the tensors: meant for CPU, where that costs no device sync.
    """
    num_tokens = query.shape[0]
    output = torch.zeros_like(query)
    if num_tokens == 0:
        return output
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    decode = (query_lens == 1).nonzero().flatten()
    if len(decode):
        rows = query_start_loc[:-1].long()[decode]
        output[rows], lse = _decode_attention(query[rows], (key_pool, value_pool), block_tables,
                                              lengths[request_slots[decode]].long(),
                                              request_slots[decode], scale, scores_pool,
                                              _rows(prior, rows))
        if lse_out is not None:
            lse_out[rows] = lse
    for r in (query_lens > 1).nonzero().flatten().tolist():
        start, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
        slot = request_slots[r]
        output[start:end] = _chunk_attention(
            query[start:end], (key_pool, value_pool), block_tables[slot], lengths[slot].long(),
            scale, scores_pool, _rows(prior, slice(start, end)),
            None if lse_out is None else lse_out[start:end])
    return output


def _rows(prior, rows):
    return None if prior is None else (prior[0][rows], prior[1][rows])


def _softmax_with_prior(logits, prior_lse):
    """Softmax over the last dim of logits [..., T] joined by one more logit per row,
    prior_lse [...] (None: none): (probabilities [..., T], the prior's weight [..., 1] or
    None)."""
    if prior_lse is None:
        return torch.softmax(logits, dim=-1), None
    joined = torch.softmax(torch.cat([logits, prior_lse[..., None]], dim=-1), dim=-1)
    return joined[..., :-1], joined[..., -1:]


def _decode_attention(query, pools, block_tables, stream_lens, request_slots, scale,
                      scores_pool, prior=None):
    """One query per request: query [R, Hq, D], stream_lens [R, H] -> (output [R, Hq, D],
    log-sum-exp [R, Hq] over the slots and the prior)."""
    num_requests, num_q_heads, head_dim = query.shape
    num_kv_heads = block_tables.shape[1]
    slots, keys, values = _read_streams(pools, block_tables[request_slots], stream_lens)
    live = torch.arange(slots.shape[-1], device=query.device) < stream_lens[..., None]
    # Unwritten slots may hold anything (NaN too): 0 * NaN would poison the sum.
    values.masked_fill_(~live[..., None], 0.0)
    queries = query.float().view(num_requests, num_kv_heads, -1, head_dim)
    logits = torch.einsum("rhgd,rhtd->rhgt", queries, keys) * scale
    logits.masked_fill_(~live[:, :, None], -torch.inf)
    prior_lse = None if prior is None else prior[1].view(num_requests, num_kv_heads, -1)
    probs, prior_weight = _softmax_with_prior(logits, prior_lse)
    if scores_pool is not None:
        _add_scores(scores_pool, slots, live, probs.sum(dim=2))
    out = torch.einsum("rhgt,rhtd->rhgd", probs, values)
    lse = torch.logsumexp(logits, dim=-1)
    if prior is not None:
        out += prior_weight * prior[0].view(out.shape)
        lse = torch.logaddexp(lse, prior_lse)
    return (out.reshape(num_requests, num_q_heads, head_dim).to(query.dtype),
            lse.reshape(num_requests, num_q_heads))


# Queries attended at once in a prefill chunk: bounds the [Hq, chunk, T] probabilities.
QUERY_CHUNK = 256


def _chunk_attention(query, pools, table, stream_lens, scale, scores_pool, prior=None,
                     lse_out=None):
    """A prefill chunk of one request: query [Q, Hq, D] (its last Q slots in every stream),
    table [H, max_blocks], stream_lens [H] -> [Q, Hq, D]; lse_out [Q, Hq] (or None) gets
    each query's log-sum-exp over its slots and the prior."""
    num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads = table.shape[0]
    group = num_q_heads // num_kv_heads
    slots, keys, values = _read_streams(pools, table, stream_lens)     # [H, T], [H, T, D]
    live = torch.arange(slots.shape[-1], device=query.device) < stream_lens[:, None]
    # SDPA adds the mask to q.k, so a NaN in an unwritten key would survive the mask.
    keys.masked_fill_(~live[..., None], 0.0)
    values.masked_fill_(~live[..., None], 0.0)
    if (scores_pool is None and prior is None and lse_out is None
            and bool((stream_lens == num_queries).all())):
        # A fresh prompt: plain causal attention, torch's fused kernel (which wants 4-D).
        out = F.scaled_dot_product_attention(
            query.float().transpose(0, 1)[None], keys[None], values[None], is_causal=True,
            scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).to(query.dtype)
    # Query i of KV head h's group sits at stream index len_h - Q + i and sees the slots
    # up to it; a query chunk never sees past its last query's slot, so keys end there.
    last_visible = stream_lens - num_queries                               # [H]
    min_visible, max_visible = int(last_visible.min()), int(last_visible.max())
    positions = torch.arange(slots.shape[-1], device=query.device)
    out = torch.empty(num_queries, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    mass = torch.zeros(num_kv_heads, slots.shape[-1], device=query.device)
    for begin in range(0, num_queries, QUERY_CHUNK):
        stop = min(begin + QUERY_CHUNK, num_queries)
        width, size = max_visible + stop, stop - begin
        # [H, G * C, D]: a group's query heads share their KV head's keys (no repeat).
        queries = (query[begin:stop].float() * scale).view(size, num_kv_heads, group, head_dim)
        queries = queries.permute(1, 2, 0, 3).reshape(num_kv_heads, group * size, head_dim)
        logits = (queries @ keys[:, :width].mT).view(num_kv_heads, group, size, width)
        # Every query of the chunk sees the slots before `shared`: only the rest is masked.
        shared = min_visible + begin + 1
        rows = torch.arange(begin, stop, device=query.device)
        hidden = positions[shared:width] > (last_visible[:, None] + rows)[:, None, :, None]
        logits[..., shared:].masked_fill_(hidden, -torch.inf)
        # Explicit softmax: faster on CPU than SDPA with a boolean mask, and it gives the
        # probabilities for the scores.
        prior_lse = None if prior is None else prior[1][begin:stop].view(
            size, num_kv_heads, group).permute(1, 2, 0)
        probs, prior_weight = _softmax_with_prior(logits, prior_lse)
        chunk = probs.view(num_kv_heads, group * size, width) @ values[:, :width]
        if prior is not None:
            chunk += (prior_weight * prior[0][begin:stop].view(size, num_kv_heads, group, head_dim)
                      .permute(1, 2, 0, 3)).view(chunk.shape)
        if lse_out is not None:
            lse = torch.logsumexp(logits, dim=-1)
            if prior is not None:
                lse = torch.logaddexp(lse, prior_lse)
            lse_out[begin:stop] = lse.permute(2, 0, 1).reshape(size, num_q_heads)
        out[begin:stop] = chunk.view(num_kv_heads, group, size, head_dim).permute(
            2, 0, 1, 3).reshape(size, num_q_heads, head_dim).to(query.dtype)
        if scores_pool is not None:
            mass[:, :width] += probs.sum(dim=(1, 2))
    if scores_pool is not None:
        _add_scores(scores_pool, slots, live, mass)
    return out


def _add_scores(scores_pool, slots, live, mass):
    """Add attention mass [..., T] to the slots' accumulated scores."""
    # Dead slots add 0 to slot 0 instead of being filtered out (no host sync).
    scores_pool.view(-1).index_add_(0, torch.where(live, slots, 0).flatten(),
                                    torch.where(live, mass, 0.0).flatten())


def _read_streams(pools: tuple[torch.Tensor, torch.Tensor], tables: torch.Tensor,
                  lengths: torch.Tensor):
    """Whole head-blocks of the streams: flat slot ids [..., T] and keys, values
    [..., T, D] float32, T = blocks * block_size."""
    key_pool, value_pool = pools
    block_size, head_dim = key_pool.shape[1], key_pool.shape[2]
    num_blocks = -(-int(lengths.max()) // block_size) if lengths.numel() else 0
    stream_blocks = (lengths + block_size - 1) // block_size
    used = torch.arange(num_blocks, device=tables.device) < stream_blocks[..., None]
    blocks = torch.where(used, tables[..., :num_blocks].long(), 0)             # [..., B]
    slots = (blocks[..., None] * block_size + torch.arange(block_size, device=tables.device))
    shape = (*blocks.shape[:-1], num_blocks * block_size, head_dim)
    return (slots.flatten(-2), key_pool[blocks].float().reshape(shape),
            value_pool[blocks].float().reshape(shape))
