"""Attention over per-head block tables vs over a dense contiguous cache of the same kept
size, for decode steps and prefill chunks.

Each of R requests has H streams whose kept lengths vary per head (head-wise compression)
around a mean T; the dense baseline holds every head at exactly T tokens, contiguous, and
runs torch's scaled_dot_product_attention. On a GPU the Triton kernel is timed too, and
the decode kernel is compared with vLLM's own paged attention (FlashAttention with a block
table) where vLLM with CUDA is installed.

    python benchmarks/bench_attention.py            # CPU: torch reference only
    python benchmarks/bench_attention.py --device cuda --json attention.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import machine, median_ms, parse, print_table, triton_runs
from vllm_kvcompress.cache import PagedStreamCache
from vllm_kvcompress.policies.selection import Selection

HEAD_DIM, BLOCK_SIZE = 128, 32


def build_cache(num_requests, heads, mean_len, q_len, dtype, device, impl):
    """A cache with ragged per-head kept lengths (mean `mean_len`), then q_len new tokens
    appended per request. Returns (cache, slots, query_start_loc)."""
    gen = torch.Generator().manual_seed(0)
    lengths = (mean_len * (0.5 + torch.rand(num_requests, heads, generator=gen))).long()
    lengths = (lengths * mean_len * heads / lengths.sum(1, keepdim=True)).long().clamp(min=1)
    # Pages for every head at the longest length: the streams are filled that far first.
    pages_per_request = -(-(int(lengths.max()) + q_len) // BLOCK_SIZE) + 1
    cache = PagedStreamCache(1, heads, HEAD_DIM, num_pages=num_requests * pages_per_request,
                             max_requests=num_requests, max_pages_per_request=pages_per_request,
                             block_size=BLOCK_SIZE, dtype=dtype, device=device, impl=impl)
    slots = list(range(num_requests))
    for r in slots:
        cache.add_pages(r, range(r * pages_per_request, (r + 1) * pages_per_request))
    # Fill streams to their ragged lengths: append the longest, then trim per head.
    longest = lengths.max(1).values.tolist()
    cache.append(slots, longest)
    keep_upto = torch.zeros(num_requests * heads, max(longest), dtype=torch.bool)
    keep_upto[torch.arange(max(longest))[None, :] < lengths.view(-1, 1)] = True
    cache.compact(0, slots, Selection(keep=keep_upto.to(device)))
    cache.layers[0].keys.normal_()
    cache.layers[0].values.normal_()
    cache.append(slots, [q_len] * num_requests)
    qsl = torch.arange(num_requests + 1, device=device, dtype=torch.int32) * q_len
    return cache, slots, qsl


def dense_attention(query, keys, values, q_len):
    """query [R, Hq, Q, D] against contiguous keys, values [R, H, T, D] (GQA), causal
    over the last Q slots."""
    total = keys.shape[2]
    mask = torch.arange(total, device=query.device)[None, :] <= \
        (total - q_len + torch.arange(q_len, device=query.device))[:, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)


def run(device: torch.device, impls: list[str], dtype: torch.dtype, smoke: bool) -> None:
    heads, group, num_requests = 8, 4, 2 if smoke else 8
    rows = []
    for q_len in (1,) if smoke else (1, 32):
        for mean_len in (64,) if smoke else (256, 1024, 4096):
            row = [q_len, mean_len]
            for impl in impls:
                cache, slots, qsl = build_cache(num_requests, heads, mean_len, q_len, dtype,
                                                device, impl)
                query = torch.randn(num_requests * q_len, heads * group, HEAD_DIM, dtype=dtype,
                                    device=device)
                for emit in (False, True):
                    row.append(median_ms(lambda: cache.attention(
                        0, query, qsl, slots, HEAD_DIM ** -0.5, emit_scores=emit,
                        max_query_len=q_len), device))
            q = torch.randn(num_requests, heads * group, q_len, HEAD_DIM, dtype=dtype,
                            device=device)
            kv = torch.randn(2, num_requests, heads, mean_len + q_len, HEAD_DIM, dtype=dtype,
                             device=device)
            row.append(median_ms(lambda: dense_attention(q, kv[0], kv[1], q_len), device))
            rows.append(row)
    headers = ["q_len", "mean kept T"]
    for impl in impls:
        headers += [f"{impl} paged ms", f"{impl} paged+scores ms"]
    print_table(headers + ["dense SDPA ms"], rows)


def compare_with_vllm(device: torch.device) -> None:
    """Decode over a full (uncompressed) cache: our Triton kernel vs vLLM's FlashAttention
    with a block table, same tokens. Needs CUDA and vLLM built with CUDA."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as error:  # vLLM absent, or a CPU build without its CUDA kernels
        print(f"\nvLLM paged attention comparison skipped: {type(error).__name__}: {error}")
        return
    heads, group, num_requests, dtype = 8, 4, 8, torch.bfloat16
    rows = []
    for context in (1024, 4096, 16384):
        cache, slots, qsl = build_cache(num_requests, heads, context - 1, 1, dtype, device,
                                        "triton")
        query = torch.randn(num_requests, heads * group, HEAD_DIM, dtype=dtype, device=device)
        ours = median_ms(lambda: cache.attention(0, query, qsl, slots, HEAD_DIM ** -0.5,
                                                 max_query_len=1), device)
        # vLLM's layout: pages [num_blocks, block_size, H, D] for keys and values.
        pages = num_requests * -(-context // BLOCK_SIZE)
        k_cache = torch.randn(pages, BLOCK_SIZE, heads, HEAD_DIM, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        block_table = torch.arange(pages, dtype=torch.int32, device=device).view(num_requests, -1)
        seq_lens = torch.full((num_requests,), context, dtype=torch.int32, device=device)
        cu_q = torch.arange(num_requests + 1, dtype=torch.int32, device=device)
        try:
            theirs = median_ms(lambda: flash_attn_varlen_func(
                q=query, k=k_cache, v=v_cache, max_seqlen_q=1, cu_seqlens_q=cu_q,
                max_seqlen_k=context, seqused_k=seq_lens, softmax_scale=HEAD_DIM ** -0.5,
                causal=True, block_table=block_table), device)
        except Exception as error:
            print(f"\nvLLM FlashAttention call failed: {type(error).__name__}: {error}")
            return
        rows.append([context, ours, theirs, ours / theirs])
    print("\nDecode, full cache, 8 requests x 32 query heads (8 KV heads), bf16:")
    print_table(["context", "ours (Triton) ms", "vLLM FlashAttention ms", "ratio"], rows)


def main() -> None:
    device, dtype, args = parse(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    print(f"{machine(device)}, dtype {dtype}, {2 if args.smoke else 8} requests x 8 KV heads "
          f"x 4 query heads per group, D={HEAD_DIM}, block_size={BLOCK_SIZE}")
    run(device, ["triton", "torch"] if triton_runs(device) else ["torch"], dtype, args.smoke)
    if device.type == "cuda":
        compare_with_vllm(device)
    else:
        print("\nvLLM paged attention comparison: needs a CUDA device (skipped on CPU).")


if __name__ == "__main__":
    main()
