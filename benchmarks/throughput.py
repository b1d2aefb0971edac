"""End-to-end throughput of vLLM with KV compression vs stock vLLM, and what compression
costs.

KV-Compress's protocol, scaled to a CPU: one in-process engine per setting, all on the
same model, the same KV cache memory and the same prompts (token ids, lengths drawn
uniformly, every request submitted at once, greedy, a fixed number of output tokens).
Stock vLLM fits only as many full-length requests as its cache holds; compressed requests
keep about budget + interval tokens per KV head, so more of them decode together. Each
compression rate (CR) r sets budget = mean prompt length / r; CR 1 sets the budget to
max_model_len, so nothing is ever evicted and the row measures the compressed path alone.

Per setting: output and total tokens per second (wall time of the stepping loop), the
most requests running in one step, preemptions, KV bytes per request at the end of
prefill (a second tier's rows counted by their packed size), output throughput relative
to stock, and the share of the model steps' time spent scoring, selecting and compacting
(the worker's CompressionMetrics). A policy with a second tier holds more than its
budget's full tokens (mikv keeps every other token at low precision) or spends part of
it on rows (ems): the KV column says what each request holds.

    python benchmarks/throughput.py                        # defaults: CPU-sized
    python benchmarks/throughput.py --rates 1 8 --num-prompts 8 --json out.json --plot cr.png
    python benchmarks/throughput.py --shared-prefix 512    # one system prompt, prefix caching
    python benchmarks/throughput.py --mix h2o --rates 1 8  # every other request runs h2o

With --shared-prefix N every prompt starts with the same N tokens and every engine runs
with vLLM's prefix caching on (off otherwise: distinct prompts share nothing); the table
then counts the prompt tokens served from the cache. With --mix POLICY every second
request sets that policy for itself (vllm_xargs / SamplingParams.extra_args), so the
compressed engines run mixed batches.
"""

from __future__ import annotations

import os

# Before vLLM is imported: engine and worker in this process (their counters are read
# directly), and a fixed CPU KV space (the NUMA-based default fails on small machines;
# the cache size itself is set per engine with num_gpu_blocks_override).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import argparse
import gc
import json
import random
import time
from dataclasses import asdict, dataclass

import torch
import vllm
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams

from timing import print_table
from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.cpu_features import default_dtype
from vllm_kvcompress.eval.memory import KVShape, stream_tokens
from vllm_kvcompress.policies.registry import implemented_policies, make_policy
from vllm_kvcompress.vllm_plugin import runtime_registry
from vllm_kvcompress.vllm_plugin.engine_setup import BLOCK_SIZE

STOCK_BLOCK_SIZE = 128  # vLLM's CPU default; both layouts store the same bytes per token
WORDS = ("the river city night green stone music window paper light summer train market "
         "garden letter silver quiet morning forest ocean").split()


@dataclass
class Result:
    setting: str
    rate: int | None  # None: stock vLLM
    budget: int | None
    wall_s: float
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    max_running: int
    preemptions: int
    kv_bytes_per_request: float
    compression_s: float
    step_s: float

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tps(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.wall_s

    @property
    def compression_share(self) -> float:
        return self.compression_s / self.step_s if self.step_s else 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a bundled model's name")
    parser.add_argument("--policy", default="snapkv", choices=implemented_policies())
    parser.add_argument("--mix", choices=implemented_policies(),
                        help="every second request runs this policy instead (per request)")
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                        help="compression rates: budget = mean prompt length / rate")
    parser.add_argument("--kv-interval", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--min-input", type=int, default=512)
    parser.add_argument("--max-input", type=int, default=1536)
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens every prompt starts with (prefix caching on when > 0)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-tokens", type=int, default=8192,
                        help="KV cache size in tokens, the same for every engine")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: the fast one on this machine (bf16 if the CPU has it)")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: on 2 shared cores, two OpenMP threads spin-wait on each other
    # and a decode step of stock vLLM took 20x longer (1.4 s instead of 70 ms).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers here")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot output throughput relative to stock vs CR (matplotlib)")
    args = parser.parse_args()
    args.dtype = args.dtype or default_dtype()
    return args


def make_prompts(tokenizer, args) -> list[list[int]]:
    """Token-id prompts of lengths uniform in [min_input, max_input], seeded, each after
    the same shared_prefix tokens."""
    rng = random.Random(args.seed)

    def words(length: int) -> list[int]:
        # Two words per token is more than enough text for `length` tokens.
        return tokenizer(" ".join(rng.choice(WORDS) for _ in range(2 * length))).input_ids[:length]

    prefix = words(args.shared_prefix) if args.shared_prefix else []
    return [prefix + words(rng.randint(args.min_input, args.max_input))
            for _ in range(args.num_prompts)]


def kv_shape(model_dir, dtype: str) -> KVShape:
    """The model's KV cache at the benchmark's dtype."""
    shape = KVShape.of_model(model_dir)
    return KVShape(shape.num_layers, shape.num_kv_heads, shape.head_size,
                   getattr(torch, dtype).itemsize)


def start_engine(model_dir, args, budget: int | None) -> LLM:
    compressed = budget is not None
    config = ({"kv_policy": args.policy, "budget": budget, "kv_interval": args.kv_interval}
              if compressed else {"kv_policy": "none"})
    block_size = BLOCK_SIZE if compressed else STOCK_BLOCK_SIZE
    # +1: vLLM reserves one block as its null block, so both engines get kv_tokens usable.
    return LLM(str(model_dir), enforce_eager=True, dtype=args.dtype, seed=args.seed,
               max_model_len=args.max_model_len, enable_prefix_caching=args.shared_prefix > 0,
               num_gpu_blocks_override=args.kv_tokens // block_size + 1,
               additional_config=config)


def stop_engine(llm: LLM) -> None:
    # The next engine in this process needs this one's distributed state torn down.
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def drive(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Submit every prompt (with its params) at once and step the engine until all finish,
    counting."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    # vLLM's own scheduler has no preemption counter: read each request's as it runs.
    preemptions: dict[str, int] = {}
    max_running = output_tokens = cached_tokens = 0
    started = time.perf_counter()
    for i, (prompt, request_params) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, request_params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                output_tokens += len(output.outputs[0].token_ids)
                cached_tokens += output.num_cached_tokens or 0
        max_running = max(max_running, len(scheduler.running))
        preemptions.update({rid: r.num_preemptions for rid, r in scheduler.requests.items()})
    return dict(wall_s=time.perf_counter() - started, output_tokens=output_tokens,
                cached_tokens=cached_tokens, max_running=max_running,
                preemptions=sum(preemptions.values()))


def compression_seconds() -> tuple[float, float]:
    """(compression, step) seconds so far in the current compressed engine's worker (its
    runtime is process-global: readable because engine and worker share this process)."""
    metrics = runtime_registry.get().metrics
    return metrics.compression_total_s, metrics.step_total_s


def budget_for(rate: int | None, prompts: list[list[int]], args) -> int | None:
    """None for stock vLLM; CR 1 never evicts (no context outgrows max_model_len)."""
    if rate is None:
        return None
    if rate == 1:
        return args.max_model_len
    return round(sum(map(len, prompts)) / len(prompts) / rate)


def request_params(args, compressed: bool) -> list[SamplingParams]:
    """Greedy, output_len tokens each; with --mix, every second compressed request sets
    its own policy."""
    plain = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    if not (args.mix and compressed):
        return [plain] * args.num_prompts
    mixed = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True,
                           extra_args={"kv_policy": args.mix})
    return [mixed if i % 2 else plain for i in range(args.num_prompts)]


def run_setting(model_dir, args, prompts, rate: int | None, shape: KVShape) -> Result:
    budget = budget_for(rate, prompts, args)
    llm = start_engine(model_dir, args, budget)
    try:
        # One short request first: lazy initialisation (and the compression runtime,
        # created on the first step) stays out of the timed loop.
        drive(llm, [prompts[0][:64]], [SamplingParams(max_tokens=4, ignore_eos=True)])
        before = compression_seconds() if budget is not None else (0.0, 0.0)
        counts = drive(llm, prompts, request_params(args, budget is not None))
        after = compression_seconds() if budget is not None else (0.0, 0.0)
    finally:
        stop_engine(llm)
    # Held per stream at the end of prefill, in full tokens: the whole prompt, or what the
    # policy keeps of it (a second tier's rows counted by their size).
    policy = make_policy(args.policy) if budget else None
    kept = [stream_tokens(policy, budget, len(p), shape) if budget else len(p) for p in prompts]
    token_bytes = shape.token_bytes * shape.num_layers * shape.num_kv_heads
    return Result(setting="stock" if rate is None else f"CR {rate}", rate=rate, budget=budget,
                  input_tokens=sum(map(len, prompts)),
                  kv_bytes_per_request=token_bytes * sum(kept) / len(kept),
                  compression_s=after[0] - before[0], step_s=after[1] - before[1], **counts)


def machine_header(args, prompts) -> str:
    lengths = [len(p) for p in prompts]
    mix = f" (every second request {args.mix})" if args.mix else ""
    return (f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load "
            f"average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, vLLM "
            f"{vllm.__version__}\nmodel {args.model}, {args.dtype}, {len(prompts)} prompts of "
            f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
            f"{args.output_len} output tokens, KV cache {args.kv_tokens} tokens, "
            f"max_model_len {args.max_model_len}, policy {args.policy}{mix}, interval "
            f"{args.kv_interval}, shared prefix {args.shared_prefix} tokens (prefix caching "
            f"{'on' if args.shared_prefix else 'off'})")


def print_results(results: list[Result]) -> None:
    stock = results[0].output_tps
    rows = [[r.setting, "-" if r.budget is None else r.budget, r.output_tps, r.total_tps,
             r.cached_tokens, r.max_running, r.preemptions,
             f"{r.kv_bytes_per_request / 2**20:.2f}",
             r.output_tps / stock, "-" if r.rate is None else f"{100 * r.compression_share:.1f}"]
            for r in results]
    print_table(["setting", "budget", "output tok/s", "total tok/s", "cached prompt tokens",
                 "max running", "preemptions", "KV MiB/request", "output vs stock",
                 "compress % of step"], rows)


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    stock = results[0].output_tps
    compressed = [r for r in results if r.rate is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r.rate for r in compressed], [r.output_tps / stock for r in compressed], "o-")
    ax.axhline(1.0, color="gray", linestyle="--", label="stock vLLM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression rate")
    ax.set_ylabel("output tok/s relative to stock")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.threads:
        # Before the first engine: vLLM's CPU worker forbids changing it afterwards.
        torch.set_num_threads(args.threads)
    model_dir = model_path(args.model)
    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), args)
    shape = kv_shape(model_dir, args.dtype)
    header = machine_header(args, prompts)
    results = [run_setting(model_dir, args, prompts, rate, shape)
               for rate in [None, *args.rates]]
    print(header)
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args),
                       "results": [asdict(r) | {"output_tps": r.output_tps,
                                                "total_tps": r.total_tps} for r in results]},
                      f, indent=2)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
