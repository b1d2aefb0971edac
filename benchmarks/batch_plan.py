"""An offline batch of tree-shaped prompts: stock vLLM in the user's (shuffled) order and
sorted, against the batch planner (sharing/batch_plan.py) with vLLM's admission and with
batch scheduling (`--kv-scheduling batch`: admission by peak pages, group prefixes held),
with and without compression, and with each document's prefix kept once at CR 8 by a
leader request and read by its questions uncompressed (sharing/group_prefix.py).

The workload is token ids: system prompts -> documents -> questions (BatchLLM's shape),
output lengths varying within each document's group, shuffled with a fixed seed. Every
engine has the same model, the same KV memory (pages of 32 tokens, sized so that LRU must
evict) and the same prompts, all submitted at once and stepped to the end. The planner
rows submit in the plan's order with the plan's exact replacement bits
(`--kv-cache-replacement predicted`) and, with batch scheduling, their groups
(`kv_group`), as `vllm_kvcompress.LLM.generate` does.

Reported: wall time, output and total tok/s, prompt tokens computed against the tree's
unique-token lower bound, prefix hit rate against the best possible (every token but the
lower bound cached), peak KV pages in use, preemptions, steps and mean tokens per step;
times are the fastest of --rounds interleaved runs (a shared VM's run times vary by 25%).

    python benchmarks/batch_plan.py
    python benchmarks/batch_plan.py --documents 4 --questions 4 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import argparse
import gc
import json
import random
import subprocess
import time

from timing import print_table
from vllm import LLM, SamplingParams

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.cpu_features import default_dtype
from vllm_kvcompress.llm import plan_batch_for
from vllm_kvcompress.sharing.batch_plan import BatchPlan
from vllm_kvcompress.sharing.group_prefix import with_leaders

PAGE_TOKENS = 32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=int, default=2)
    parser.add_argument("--documents", type=int, default=6, help="per system prompt")
    parser.add_argument("--questions", type=int, default=6, help="per document")
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--document-tokens", type=int, nargs=2, default=[512, 1024])
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, nargs=2, default=[16, 128],
                        help="output lengths, uniform in this range")
    parser.add_argument("--kv-pages", type=int, default=128, help="KV cache, pages of 32")
    parser.add_argument("--compression-rate", type=int, default=8)
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--interval", type=int, default=16,
                        help="--kv-interval of the compressed rows (tokens between compressions)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per setting, interleaved (the fastest is reported)")
    parser.add_argument("--only", nargs="*", type=int, metavar="ROW",
                        help="run only these rows of the table (0-based; sorted is always run)")
    parser.add_argument("--json", metavar="FILE")
    return parser.parse_args()


def tree_workload(args) -> tuple[list[list[int]], list[int]]:
    """Shuffled token-id prompts and their output lengths."""
    rng = random.Random(args.seed)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(count)]

    prompts, outputs = [], []
    for _ in range(args.systems):
        system = tokens(args.system_tokens)
        for _ in range(args.documents):
            document = tokens(rng.randint(*args.document_tokens))
            for _ in range(args.questions):
                prompts.append(system + document + tokens(args.question_tokens))
                outputs.append(rng.randint(*args.output_tokens))
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [outputs[i] for i in order]


def planned_requests(prompts, outputs, order: list[int], config: dict,
                     plan: BatchPlan | None) -> list[tuple]:
    """(request id, prompt, params, counted) in submission order."""
    requests = []
    for i in order:
        extra = None
        if plan is not None:    # what vllm_kvcompress.LLM.generate sends
            extra = plan.extra_args(i, hints=True, groups=config.get("kv_scheduling") == "batch")
        params = SamplingParams(max_tokens=outputs[i], temperature=0, ignore_eos=True,
                                extra_args=extra)
        requests.append((f"r{i}", prompts[i], params, True))
    return requests


def group_prefix_requests(prompts, outputs, plan: BatchPlan, rate: int) -> list[tuple]:
    """The plan's order with each prefix group's leader before its members, as
    `vllm_kvcompress.LLM.generate(..., group_prefix_rate=rate)` submits it."""
    requests = []
    for number, sub in enumerate(with_leaders(prompts, plan.order, PAGE_TOKENS, rate)):
        if sub.index is None:
            params = SamplingParams(max_tokens=1, temperature=0, extra_args=sub.extra)
            requests.append((f"lead{number}", sub.prompt, params, False))
            continue
        extra = plan.extra_args(sub.index, hints=True, groups=True) | sub.extra
        params = SamplingParams(max_tokens=outputs[sub.index], temperature=0, ignore_eos=True,
                                extra_args=extra)
        requests.append((f"r{sub.index}", sub.prompt, params, True))
    return requests


def run(model_dir: str, args, requests: list[tuple], config: dict) -> dict:
    llm = LLM(model_dir, enforce_eager=True, dtype=args.dtype, seed=0, max_model_len=2048,
              block_size=PAGE_TOKENS, enable_prefix_caching=True,
              num_gpu_blocks_override=args.kv_pages + 1, additional_config=config)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    counted = {rid for rid, _, _, count in requests if count}
    try:
        for rid, prompt, params, _ in requests:
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        preemptions: dict[str, int] = {}
        steps = computed = output_tokens = peak = running = 0
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    # Every prompt token computed, leaders' included; outputs of requests.
                    computed += len(output.prompt_token_ids) - (output.num_cached_tokens or 0)
                    if output.request_id in counted:
                        output_tokens += len(output.outputs[0].token_ids)
            steps += 1
            running += len(scheduler.running)
            peak = max(peak, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
            preemptions.update({r: q.num_preemptions for r, q in scheduler.requests.items()})
        wall = time.perf_counter() - started
    finally:
        engine.engine_core.shutdown()
        del llm
        gc.collect()
    prompt_tokens = sum(len(prompt) for rid, prompt, _, _ in requests if rid in counted)
    return dict(wall_s=wall, output_tok_per_s=output_tokens / wall,
                total_tok_per_s=(prompt_tokens + output_tokens) / wall,
                computed_prompt_tokens=computed, hit_rate=1 - computed / prompt_tokens,
                peak_pages=peak, preemptions=sum(preemptions.values()), steps=steps,
                tokens_per_step=(computed + output_tokens) / steps,
                mean_running=running / steps)


def main() -> None:
    args = parse_args()
    args.dtype = args.dtype or default_dtype()
    model_dir = str(model_path(DEFAULT_MODEL))
    prompts, outputs = tree_workload(args)
    plan = plan_batch_for(prompts, [SamplingParams(max_tokens=m) for m in outputs],
                          PAGE_TOKENS, args.kv_pages)
    prompt_tokens = sum(map(len, prompts))
    best_hit_rate = 1 - plan.unique_prompt_tokens / prompt_tokens
    budget = prompt_tokens // len(prompts) // args.compression_rate
    shuffled = list(range(len(prompts)))
    planned = {"kv_cache_replacement": "predicted"}
    batch = {**planned, "kv_scheduling": "batch"}
    compressed = {"kv_policy": args.policy, "budget": budget, "kv_interval": args.interval}
    cr = f"{args.policy} CR {args.compression_rate}"
    by_prompt = sorted(shuffled, key=lambda i: prompts[i])
    settings = [
        ("stock vLLM, shuffled", planned_requests(prompts, outputs, shuffled, {}, None), {}),
        ("stock vLLM, sorted", planned_requests(prompts, outputs, by_prompt, {}, None), {}),
        ("planner, vLLM admission", planned_requests(prompts, outputs, plan.order, planned, plan),
         planned),
        ("planner, batch scheduling", planned_requests(prompts, outputs, plan.order, batch, plan),
         batch),
        (f"planner, vLLM admission, {cr}",
         planned_requests(prompts, outputs, plan.order, planned, plan), {**planned, **compressed}),
        (f"planner, batch scheduling, {cr}",
         planned_requests(prompts, outputs, plan.order, batch, plan), {**batch, **compressed}),
        (f"planner, batch scheduling, group prefixes kept at CR {args.compression_rate}",
         group_prefix_requests(prompts, outputs, plan, args.compression_rate),
         {**batch, **compressed}),
    ]
    if args.only is not None:
        settings = [row for i, row in enumerate(settings) if i == 1 or i in args.only]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit}, {args.dtype}, {len(prompts)} requests ({plan.num_groups} groups), "
          f"{prompt_tokens} prompt tokens, lower bound {plan.unique_prompt_tokens} "
          f"(best hit rate {best_hit_rate:.3f}), KV cache {args.kv_pages} pages of "
          f"{PAGE_TOKENS}, load average {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[dict]] = {label: [] for label, *_ in settings}
    for _ in range(args.rounds):     # interleaved: a slow spell hits every setting
        for label, requests, config in settings:
            runs[label].append(run(model_dir, args, requests, config))
    results = [{"setting": label, "walls_s": [r["wall_s"] for r in runs[label]],
                **min(runs[label], key=lambda r: r["wall_s"])} for label, *_ in settings]
    sorted_tps = next(r for r in results if r["setting"] == "stock vLLM, sorted")["total_tok_per_s"]
    print_table(["setting", "wall s", "output tok/s", "total tok/s", "vs sorted",
                 "prompt tokens computed", "vs lower bound", "hit rate", "vs best", "peak pages",
                 "preemptions", "steps", "tokens/step", "running/step"],
                [[r["setting"], r["wall_s"], r["output_tok_per_s"], r["total_tok_per_s"],
                  r["total_tok_per_s"] / sorted_tps, r["computed_prompt_tokens"],
                  r["computed_prompt_tokens"] / plan.unique_prompt_tokens, r["hit_rate"],
                  r["hit_rate"] / best_hit_rate, r["peak_pages"], r["preemptions"],
                  r["steps"], r["tokens_per_step"], r["mean_running"]] for r in results])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "lower_bound": plan.unique_prompt_tokens,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
