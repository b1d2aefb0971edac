"""Prefix-cache replacement with one-bit predictions: simulated hit rates on the synthetic
traces, and end to end through vLLM (stock LRU vs `--kv-cache-replacement predicted`).

Simulator: every trace generator at several cache sizes, the hit rates of LRU, Belady's
offline optimum, marking with perfect discard bits and phase bits, with the learned online
predictor and with the trace's own hints; adversarial bits (every perfect bit inverted)
against the guard's bound; the share of the LRU-to-Belady gap each predictor closes.
The plot is the smoothness curve: hit rate as perfect bits are flipped at rate epsilon.

Engine: one in-process vLLM engine per setting, same model, same KV memory (a prefix
cache of --engine-cache-pages pages of 32 tokens), the same token-id prompts built from a
trace (each page's 32 tokens derive from its chain hash, so prompts share exactly the
trace's prefixes), submitted in trace order with --concurrency requests in flight.
Reported: the prompt tokens served from the prefix cache, the simulator's prediction for
the same trace and cache, and throughput (the fastest of --rounds interleaved runs: on a
shared VM one run's throughput moves by 20% and more).

    python benchmarks/cache_replacement.py                     # simulator, about a minute
    python benchmarks/cache_replacement.py --plot docs/cache-replacement.png --json out.json
    python benchmarks/cache_replacement.py --cache-pages --engine   # vLLM only, ~25 min
"""

from __future__ import annotations

import os

# Before vLLM is imported: the engine in this process, a fixed CPU KV space (the cache size
# itself is set per engine with num_gpu_blocks_override).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import argparse
import gc
import json
import random
import subprocess
import time
from collections import deque

from timing import print_table
from vllm_kvcompress.sharing.cache_sim import belady, replay
from vllm_kvcompress.sharing.cache_sim_command import compare
from vllm_kvcompress.sharing.predictors import OnlinePredictor, exact_hints
from vllm_kvcompress.sharing.replacement import LRU, Marking
from vllm_kvcompress.sharing.traces import GENERATORS, TraceRequest, batch_tree, multi_turn_chat

FLIPS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
PAGE_TOKENS = 32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-pages", type=int, nargs="*", default=[64, 128, 256],
                        help="simulated cache sizes (none: skip the simulator)")
    parser.add_argument("--engine", action="store_true", help="also run vLLM end to end")
    parser.add_argument("--workloads", nargs="+", default=["multi-turn", "shuffled batch"],
                        choices=["multi-turn", "shuffled batch"], help="end-to-end workloads")
    parser.add_argument("--engine-cache-pages", type=int, default=96,
                        help="the engines' KV cache in pages of 32 tokens")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=2,
                        help="end-to-end runs per setting (the fastest is reported)")
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: the fast one on this machine")
    parser.add_argument("--json", metavar="FILE", help="write every number here")
    parser.add_argument("--plot", metavar="FILE.png", help="the smoothness curves (matplotlib)")
    return parser.parse_args()


def gap_closed(rates: dict[str, float], name: str) -> float:
    gap = rates["belady"] - rates["lru"]
    return (rates[name] - rates["lru"]) / gap if gap > 0 else float("nan")


def simulate(caches: list[int]) -> list[dict]:
    results = []
    for kind, generate in GENERATORS.items():
        trace = generate()
        longest = max(len(r.pages) for r in trace)
        for capacity in caches:
            if capacity < longest:
                continue
            rates = compare(trace, capacity, FLIPS)
            results.append({"trace": kind, "cache_pages": capacity, **rates})
    return results


def turn_oracle(caches: list[int], thresholds=(0.3, 0.5, 0.7, 0.9)) -> list[dict]:
    """The best a bit predicted from a chat's app (its system prompt) and turn number can
    do on the multi-turn trace: a chat's pages are hinted discard when the trace's own
    share of last turns among requests of that app at that turn is >= the threshold (an
    oracle of the hazard, which a predictor learning from these features can only
    estimate): how much of the LRU-to-Belady gap those two features can explain."""
    trace, system_pages = multi_turn_chat(), 4
    seen: dict[str, int] = {}
    keys = []
    for request in trace:
        chat = request.pages[system_pages]        # the chat's first own page
        keys.append((request.pages[0], seen.get(chat, 0)))
        seen[chat] = seen.get(chat, 0) + 1
    lasts: dict[tuple, list[int]] = {}
    for key, request in zip(keys, trace):
        counts = lasts.setdefault(key, [0, 0])
        counts[0] += request.discard[-1]
        counts[1] += 1
    results = []
    for capacity in caches:
        lru = replay(trace, capacity, LRU()).hit_rate
        best = belady(trace, capacity)[0].hit_rate
        row = {"cache_pages": capacity, "lru": lru, "belady": best}
        for threshold in thresholds:
            bits = [[0] * system_pages + [int(lasts[k][0] / lasts[k][1] >= threshold)]
                    * (len(r.pages) - system_pages) for k, r in zip(keys, trace)]
            rate = replay(trace, capacity, Marking(capacity), bits).hit_rate
            row[f"p>={threshold:g}"] = (rate - lru) / (best - lru)
        results.append(row)
    return results


def print_turn_oracle(results: list[dict]) -> None:
    print("\nmulti-turn: share of the LRU-to-Belady gap closed by bits from (app, turn) "
          "with the trace's own last-turn frequencies")
    names = [k for k in results[0] if k.startswith("p>=")]
    print_table(["pages", "lru", "belady", *names],
                [[r["cache_pages"], r["lru"], r["belady"], *(f"{r[n]:+.2f}" for n in names)]
                 for r in results])


def print_simulation(results: list[dict]) -> None:
    rows = []
    for r in results:
        hints = r.get("hints")
        rows.append([r["trace"], r["cache_pages"], r["lru"], r["belady"], r["perfect"],
                     r["perfect"] / r["belady"], r["perfect-phase"], r["learned"],
                     f"{gap_closed(r, 'learned'):+.2f}",
                     "-" if hints is None else hints,
                     "-" if hints is None else f"{gap_closed(r, 'hints'):+.2f}",
                     r["adversarial"], int(r["adversarial_misses"]),
                     int(r["adversarial_misses_bound"]),
                     "yes" if r["adversarial_misses"] <= r["adversarial_misses_bound"] else "NO"])
    print_table(["trace", "pages", "lru", "belady", "perfect", "perfect/belady", "phase",
                 "learned", "learned gap", "hints", "hints gap", "adversarial",
                 "adv. misses", "bound", "holds"], rows)


def plot(results: list[dict], path: str, capacity: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = [r for r in results if r["cache_pages"] == capacity]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3.4), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        eps = [0.0, *FLIPS, 1.0]
        rates = [r["perfect"], *(r[f"flip-{f:g}"] for f in FLIPS), r["adversarial"]]
        ax.plot(eps, rates, marker="o", label="marking, bits flipped at eps")
        ax.axhline(r["belady"], color="green", linestyle="--", label="Belady")
        ax.axhline(r["lru"], color="gray", linestyle=":", label="LRU")
        ax.set_title(f"{r['trace']}, {capacity} pages")
        ax.set_xlabel("epsilon (share of bits wrong)")
    axes[0][0].set_ylabel("prefix hit rate (pages)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- end to end ---------------------------------------------------------------------------

def engine_workloads() -> dict[str, list[TraceRequest]]:
    """Smaller than the simulator's traces: every prompt runs through the model."""
    return {"multi-turn": multi_turn_chat(conversations=80, active=16),
            "shuffled batch": batch_tree(documents=8, document_pages=(8, 16))}


def prompts_of(trace: list[TraceRequest]) -> list[list[int]]:
    """Token ids: each page's tokens are seeded by its chain hash (which covers the pages
    before it), so two prompts share exactly the pages their trace entries share."""
    def page_tokens(page: str) -> list[int]:
        rng = random.Random(page)
        return [rng.randrange(1000, 40000) for _ in range(PAGE_TOKENS)]
    return [[t for page in request.pages for t in page_tokens(page)] for request in trace]


def simulated(trace, capacity: int, replacement: str | None, hints: list | None):
    """The simulator's replay of what the engine was given."""
    if replacement is None:
        return replay(trace, capacity, LRU())
    if hints is None:
        return replay(trace, capacity, Marking(capacity), predictor=OnlinePredictor(capacity))
    bits = [hint if isinstance(hint, list) else [int(hint == "discard")] * len(r.pages)
            for hint, r in zip(hints, trace)]
    return replay(trace, capacity, Marking(capacity), bits)


def drive(llm, prompts: list[list[int]], params: list, concurrency: int) -> dict:
    """Submit in order, at most `concurrency` in flight; step until all finish."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    queue = deque(enumerate(zip(prompts, params)))
    in_flight = cached = output_tokens = steps = 0
    preemptions: dict[str, int] = {}
    started = time.perf_counter()
    while queue or engine.has_unfinished_requests():
        while queue and in_flight < concurrency:
            i, (prompt, request_params) = queue.popleft()
            engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, request_params)
            in_flight += 1
        for output in engine.step():
            if output.finished:
                in_flight -= 1
                cached += output.num_cached_tokens or 0
                output_tokens += len(output.outputs[0].token_ids)
        steps += 1
        preemptions.update({rid: r.num_preemptions for rid, r in scheduler.requests.items()})
    wall = time.perf_counter() - started
    prompt_tokens = sum(len(p) for p in prompts)
    return dict(wall_s=wall, cached_share=cached / prompt_tokens, steps=steps,
                preemptions=sum(preemptions.values()),
                requests_per_s=len(prompts) / wall,
                total_tok_per_s=(prompt_tokens + output_tokens) / wall)


def run_engine(model_dir: str, dtype: str, cache_pages: int, replacement: str | None,
               prompts, params, concurrency: int) -> dict:
    from vllm import LLM
    config = {} if replacement is None else {"kv_cache_replacement": replacement}
    llm = LLM(model_dir, enforce_eager=True, dtype=dtype, seed=0, max_model_len=2048,
              block_size=PAGE_TOKENS, enable_prefix_caching=True,
              # +1: vLLM's null block; both engines get cache_pages usable pages.
              num_gpu_blocks_override=cache_pages + 1, additional_config=config)
    try:
        return drive(llm, prompts, params, concurrency)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def end_to_end(args) -> list[dict]:
    from vllm import SamplingParams

    from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
    from vllm_kvcompress.cpu_features import default_dtype
    model_dir, dtype = str(model_path(DEFAULT_MODEL)), args.dtype or default_dtype()
    greedy = dict(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    results = []
    for name, trace in engine_workloads().items():
        if name not in args.workloads:
            continue
        prompts = prompts_of(trace)
        settings = [("stock vLLM (LRU)", None, None), ("predicted, learned", "predicted", None)]
        if all(r.discard is not None for r in trace):
            # A client knows a chat's last turn: "discard" then, "keep" before.
            settings.append(("predicted, last-turn hints", "predicted",
                             ["discard" if any(r.discard) else "keep" for r in trace]))
        else:
            # An offline batch is known whole: Belady's bits on its own lookups.
            settings.append(("predicted, exact (batch known)", "predicted",
                             exact_hints(prompts, args.engine_cache_pages, PAGE_TOKENS)))
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in settings}
        for _ in range(args.rounds):     # interleaved: a slow spell hits every setting
            for label, replacement, hints in settings:
                params = [SamplingParams(**greedy, extra_args=None if hints is None
                                         else {"kv_cache_hint": hint})
                          for hint in (hints or [None] * len(trace))]
                runs[label].append(run_engine(model_dir, dtype, args.engine_cache_pages,
                                              replacement, prompts, params, args.concurrency))
        stock = None
        for label, replacement, hints in settings:
            fastest = min(runs[label], key=lambda numbers: numbers["wall_s"])
            stock = stock or fastest
            sim = simulated(trace, args.engine_cache_pages, replacement, hints)
            results.append({"workload": name, "setting": label, "requests": len(trace),
                            "simulated_hit_rate": sim.hit_rate,
                            "walls_s": [numbers["wall_s"] for numbers in runs[label]],
                            "throughput_vs_stock": fastest["total_tok_per_s"]
                            / stock["total_tok_per_s"], **fastest})
    return results


def print_end_to_end(results: list[dict], args) -> None:
    print(f"\nvLLM end to end: {args.engine_cache_pages} pages of {PAGE_TOKENS} tokens, "
          f"{args.concurrency} requests in flight, {args.output_len} output tokens; "
          f"throughput of the fastest of {args.rounds} interleaved rounds")
    print_table(["workload", "setting", "requests", "prompt tokens cached", "simulated hit rate",
                 "steps", "preemptions", "requests/s", "total tok/s", "throughput vs stock"],
                [[r["workload"], r["setting"], r["requests"], r["cached_share"],
                  r["simulated_hit_rate"], r["steps"], r["preemptions"], r["requests_per_s"],
                  r["total_tok_per_s"], r["throughput_vs_stock"]] for r in results])


def main() -> None:
    args = parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, load average {os.getloadavg()[0]:.1f}")
    results = simulate(args.cache_pages) if args.cache_pages else []
    if results:
        print_simulation(results)
        oracle = turn_oracle(args.cache_pages)
        print_turn_oracle(oracle)
    engine = []
    if args.engine:
        engine = end_to_end(args)
        print_end_to_end(engine, args)
    if args.plot and results:
        plot(results, args.plot, sorted(args.cache_pages)[len(args.cache_pages) // 2])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"simulator": results, "turn_oracle": oracle if results else [],
                       "engine": engine}, f, indent=1)


if __name__ == "__main__":
    main()
