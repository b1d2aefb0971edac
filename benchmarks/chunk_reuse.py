"""RAG chunk reuse (Cache-Craft): quality and prompt compute against full recompute and
against vLLM's prefix caching, on the bundled model through the transformers reference.

Workload (eval/rag_workload.py): a pool of passages cut from the GPL-3 text, each with one
inserted fact, drawn with Zipf popularity, 4-6 per prompt in random order, then a question
about one fact of the prompt; greedy, 16 tokens. Recompute selections: Cache-Craft's
(attention that went outside the chunk when stored), CacheBlend's (value deviation at
layer 1) and random; chunks stored at 25% of their tokens, kept by the attention they
received inside the chunk or by their surprisal (-log p when computed). Every setting replays the same requests
in the same order with its own chunk store (a chunk is saved the first time a request
computes it in full). Reported per setting: accuracy (the asked value in the answer),
agreement with full recompute (the share of the first 16 tokens before the first
difference), prompt tokens computed per request with and without an exact prefix cache
under it (pages of 16 tokens, unbounded: the best case for stock vLLM), the prompt
forward's seconds relative to full recompute (same run), and the store's size.

    python benchmarks/chunk_reuse.py                 # ~15 min on a 2-core CPU
    python benchmarks/chunk_reuse.py --requests 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from timing import print_table
from vllm_kvcompress.bundled_models import model_path
from vllm_kvcompress.eval.chunk_reuse_runner import FULL_RECOMPUTE, ChunkReuseRunner, ReuseSetting
from vllm_kvcompress.eval.rag_workload import rag_workload
from vllm_kvcompress.sharing.chunk_store import ChunkStore

PAGE_TOKENS = 16
MAX_NEW_TOKENS = 16
SETTINGS = [FULL_RECOMPUTE] + [
    ReuseSetting(f"reuse, recompute {round(r * 100)}% by attention", recompute=r)
    for r in (0.0, 0.05, 0.15, 0.30)
] + [
    ReuseSetting(f"reuse, recompute {round(r * 100)}% random", recompute=r, selection="random")
    for r in (0.05, 0.15, 0.30)
] + [
    ReuseSetting(f"reuse, recompute {round(r * 100)}% by value deviation", recompute=r,
                 selection="deviation")
    for r in (0.15, 0.30)
] + [
    ReuseSetting("reuse without the RoPE fix, 15% by attention", fix_rope=False),
] + [
    ReuseSetting(f"stored at 25% by attention received, recompute {round(r * 100)}%",
                 recompute=r, chunk_budget=0.25)
    for r in (0.0, 0.15, 0.30)
] + [
    ReuseSetting(f"stored at 25% by surprisal, recompute {round(r * 100)}%", recompute=r,
                 chunk_budget=0.25, chunk_score="surprisal")
    for r in (0.0, 0.15, 0.30)
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--pool", type=int, default=30, help="passages in the pool")
    parser.add_argument("--passage-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-gib", type=float, default=1.0, help="chunk store bound")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--only", type=int, nargs="+",
                        help="run only these settings (indices into SETTINGS; 0, full "
                             "recompute, is always run: the others are compared with it)")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args()


def prefix_hits(requests) -> list[int]:
    """Per request, the tokens an unbounded exact prefix cache of full pages serves."""
    hits = []
    for index, request in enumerate(requests):
        best = 0
        for earlier in requests[:index]:
            common = 0
            for a, b in zip(request.token_ids, earlier.token_ids):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        hits.append(min(best, len(request.token_ids) - 1) // PAGE_TOKENS * PAGE_TOKENS)
    return hits


def agreement(tokens: list[int], reference: list[int]) -> float:
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same / MAX_NEW_TOKENS


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = ChunkReuseRunner(model_path())
    requests = rag_workload(runner.tokenizer, args.requests, args.pool, args.passage_tokens,
                            seed=args.seed)
    hits = prefix_hits(requests)
    prompt_tokens = sum(len(r.token_ids) for r in requests)
    prefix_computed = prompt_tokens - sum(hits)
    print(f"{len(requests)} requests, {prompt_tokens / len(requests):.0f} prompt tokens each, "
          f"{torch.get_num_threads()} threads; prefix caching computes "
          f"{prefix_computed / len(requests):.0f} per request")
    rows, reference_tokens, full_seconds = [], None, None
    settings = [SETTINGS[0]] + [SETTINGS[i] for i in args.only if i] if args.only else SETTINGS
    for setting in settings:
        store = ChunkStore(int(args.store_gib * 2**30))
        generator = torch.Generator().manual_seed(args.seed)
        correct, agreed, computed, computed_over_prefix, seconds, answers = 0, 0.0, 0, 0, 0.0, []
        began = time.perf_counter()
        for index, request in enumerate(requests):
            outcome = runner.answer(request.token_ids, request.spans, setting, store,
                                    MAX_NEW_TOKENS, generator)
            answers.append(outcome.token_ids)
            correct += request.reference in outcome.text
            if reference_tokens is not None:
                agreed += agreement(outcome.token_ids, reference_tokens[index])
            computed += outcome.computed
            computed_over_prefix += outcome.computed_after(hits[index])
            seconds += outcome.prefill_s
        if reference_tokens is None:
            reference_tokens, full_seconds = answers, seconds
            agreed = float(len(requests))
        n = len(requests)
        row = {"setting": setting.label, "accuracy": correct / n, "agreement": agreed / n,
               "computed": computed / n, "computed_with_prefix_cache": computed_over_prefix / n,
               "vs_prefix_caching": computed_over_prefix / prefix_computed,
               "prefill_vs_full": seconds / full_seconds,
               "store_mib": store.bytes / 2**20, "store_hits": store.hits,
               "store_lookups": store.lookups, "wall_s": time.perf_counter() - began}
        rows.append(row)
        print(f"  {setting.label}: {row['accuracy']:.3f} accuracy, {row['wall_s']:.0f} s", flush=True)
    print_table(["setting", "accuracy", "agreement (16 tokens)", "prompt tokens computed",
                 "with a prefix cache", "vs prefix caching", "prompt forward vs full",
                 "store MiB", "chunk hits"],
                [[r["setting"], r["accuracy"], r["agreement"], f"{r['computed']:.0f}",
                  f"{r['computed_with_prefix_cache']:.0f}", r["vs_prefix_caching"],
                  r["prefill_vs_full"], f"{r['store_mib']:.0f}",
                  f"{r['store_hits']}/{r['store_lookups']}"] for r in rows])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
