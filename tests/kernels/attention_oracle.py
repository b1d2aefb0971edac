"""Plain-math attention over each stream's kept tokens (float64, loops): the test oracle."""

from __future__ import annotations

import torch

from random_streams import PagedStreams


def naive_paged_attention(streams: PagedStreams, scale: float):
    """Returns (output [tokens, Hq, D] float64, mass: [R][H] -> [len] float64), where mass
    is each slot's probability summed over the request's queries and the group's heads."""
    query = streams.query.double().cpu()
    num_q_heads = query.shape[1]
    num_kv_heads = len(streams.dense_keys[0]) if streams.dense_keys else 1
    group = num_q_heads // num_kv_heads
    qsl = streams.query_start_loc.tolist()
    output = torch.zeros_like(query)
    mass = [[torch.zeros(len(k), dtype=torch.float64) for k in row] for row in streams.dense_keys]
    for r in range(len(qsl) - 1):
        q_len = qsl[r + 1] - qsl[r]
        for q_head in range(num_q_heads):
            h = q_head // group
            keys, values = streams.dense_keys[r][h], streams.dense_values[r][h]
            for i in range(q_len):
                visible = len(keys) - q_len + i + 1
                q = query[qsl[r] + i, q_head]
                probs = torch.softmax(keys[:visible] @ q * scale, dim=0)
                output[qsl[r] + i, q_head] = probs @ values[:visible]
                mass[r][h][:visible] += probs
    return output, mass
