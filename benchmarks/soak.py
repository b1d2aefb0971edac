"""Soak: a real `vllm serve` with compression on, under load, then checked for leftovers.

The server runs the card's setting (`--kv-policy ems --budget 256`) on a KV cache small
enough that vLLM preempts. Clients send requests at a fixed concurrency, each one of:
- complete: a completion with a random policy and budget (every implemented policy);
- stream:   the same, streamed to the end;
- abort:    streamed, the client hangs up after a few chunks (vLLM aborts the request);
- bad:      a bad per-request setting, which must get HTTP 400 naming it;
- pair:     greedy twice, once with a budget above the context and once with
            `kv_policy: none`: the texts must be identical.
Prompts are token ids of random lengths; the server's default policy applies when a
request names none. At the end, once nothing runs: the server is healthy, vLLM's KV
cache usage is back to 0 (no page leaked), the plugin's gauges read idle, and the log
holds no traceback. Exits 1 if any check or any request failed.

    python benchmarks/soak.py                                   # 500 requests, 32 at once
    python benchmarks/soak.py --requests 64 --concurrency 16 --json soak.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.eval.memory import KVShape
from vllm_kvcompress.policies.registry import implemented_policies
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

KINDS = {"complete": 0.4, "stream": 0.15, "abort": 0.15, "bad": 0.1, "pair": 0.2}
BUDGETS = (32, 64, 128, 256, 512)
# (vllm_xargs, a word the 400's message must hold)
BAD_SETTINGS = (
    ({"budget": 0}, "budget"),
    ({"budget": "many"}, "budget"),
    ({"kv_policy": "fifo"}, "kv_policy"),
    ({"kv_window": 64}, "kv_window"),
    ({"kv_policy": "mikv", "kv_policy_args": '{"key_bits": 9}'}, "key_bits"),
    ({"kv_policy": "snapkv", "kv_policy_args": "{oops"}, "kv_policy_args"),
)
IDLE_GAUGES = {"vllm:kv_compress_tokens_seen": 0.0, "vllm:kv_compress_tokens_kept": 0.0,
               "vllm:kv_compress_ratio": 1.0, "vllm:kv_compress_bytes_seen": 0.0,
               "vllm:kv_compress_bytes_kept": 0.0}


@dataclass
class Job:
    kind: str
    prompt: list[int]
    max_tokens: int
    xargs: dict = field(default_factory=dict)
    expect: str = ""  # bad: the word the error must name


@dataclass
class Outcome:
    kind: str
    ok: bool
    output_tokens: int = 0
    detail: str = ""


@dataclass
class Report:
    requests: int = 0           # HTTP requests sent (a pair sends two)
    completed: int = 0
    streamed: int = 0
    aborted: int = 0
    rejected_400: int = 0
    pairs_identical: int = 0
    pairs: int = 0
    output_tokens: int = 0
    preemptions: float = 0.0
    compressions: float = 0.0
    pages_freed: float = 0.0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def make_jobs(count: int, max_prompt: int, max_output: int, max_model_len: int, vocab: int,
              seed: int) -> list[Job]:
    rng = random.Random(seed)
    policies = [p for p in implemented_policies() if p != "none"]
    kinds, weights = zip(*KINDS.items())
    jobs = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(16, max_prompt))]
        job = Job(kind, prompt, rng.randint(4, max_output))
        if kind == "bad":
            job.xargs, job.expect = rng.choice(BAD_SETTINGS)
        elif kind == "pair":
            job.xargs = {"kv_policy": rng.choice(policies), "budget": max_model_len}
        elif rng.random() < 0.8:  # else the server's default (ems at 256)
            job.xargs = {"kv_policy": rng.choice(policies), "budget": rng.choice(BUDGETS)}
        jobs.append(job)
    return jobs


def post(server: VllmServer, job: Job, xargs: dict, stream: bool):
    body = {"model": "soak", "prompt": job.prompt, "max_tokens": job.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            **({"vllm_xargs": xargs} if xargs else {})}
    request = urllib.request.Request(f"{server.url}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def complete(server: VllmServer, job: Job, xargs: dict) -> tuple[str, int]:
    with post(server, job, xargs, stream=False) as response:
        reply = json.loads(response.read())
    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]


def stream(server: VllmServer, job: Job, stop_after: int | None = None) -> int:
    """Read the stream's chunks; returns the completion tokens its usage reports (or the
    chunks read, when hanging up after `stop_after`)."""
    chunks = 0
    with post(server, job, job.xargs, stream=True) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk.get("usage"):
                return chunk["usage"]["completion_tokens"]
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                return chunks
    return chunks


def run_job(server: VllmServer, job: Job, rng: random.Random) -> Outcome:
    try:
        if job.kind == "complete":
            _, tokens = complete(server, job, job.xargs)
            return Outcome("complete", tokens == job.max_tokens, tokens, f"{tokens} tokens")
        if job.kind == "stream":
            tokens = stream(server, job)
            return Outcome("stream", tokens == job.max_tokens, tokens, f"{tokens} tokens")
        if job.kind == "abort":
            chunks = stream(server, job, stop_after=rng.randint(1, 3))
            return Outcome("abort", chunks >= 1, chunks)
        if job.kind == "pair":
            kept, tokens = complete(server, job, job.xargs)
            stock, _ = complete(server, job, {"kv_policy": "none"})
            return Outcome("pair", kept == stock, 2 * tokens,
                           f"{job.xargs}: {kept!r} != {stock!r}")
        try:
            complete(server, job, job.xargs)
        except urllib.error.HTTPError as error:
            message = json.loads(error.read())["error"]["message"]
            return Outcome("bad", error.code == 400 and job.expect in message, 0,
                           f"{job.xargs}: HTTP {error.code} {message}")
        return Outcome("bad", False, 0, f"{job.xargs} was accepted")
    except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError) as error:
        return Outcome(job.kind, False, 0, f"{job.kind} {job.xargs}: {error!r}")


def wait_idle(server: VllmServer, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once no request runs or waits and the gauges have caught up."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        busy = (metrics.get("vllm:num_requests_running", 0)
                + metrics.get("vllm:num_requests_waiting", 0))
        gauges = {name: metrics.get(name) for name in IDLE_GAUGES}
        if (not busy and gauges == IDLE_GAUGES) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.5)


def end_checks(server: VllmServer, metrics: dict[str, float]) -> list[str]:
    failures = []
    try:
        server.get_text("/health")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        failures.append(f"server not healthy at the end: {error!r}")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        if metrics.get(name, 0.0) != 0.0:
            failures.append(f"{name} = {metrics[name]} with nothing to do")
    for name, idle in IDLE_GAUGES.items():
        if metrics.get(name) != idle:
            failures.append(f"{name} = {metrics.get(name)}, idle is {idle}")
    log = server.log_path.read_text(errors="replace")
    if "Traceback" in log:
        start = log.index("Traceback")
        failures.append(f"traceback in the server log:\n{log[start:start + 2000]}")
    return failures


def soak(args: argparse.Namespace) -> Report:
    model = args.model or str(model_path(DEFAULT_MODEL))
    shape = KVShape.of_model(model)
    dtype_bytes = 4 if args.dtype == "float32" else 2
    token_bytes = shape.num_layers * shape.num_kv_heads * 2 * shape.head_size * dtype_bytes
    kv_bytes = args.kv_cache_tokens * token_bytes
    server_args = [*CPU_DEFAULT_ARGS, "--served-model-name", "soak", "--dtype", args.dtype,
                   "--max-model-len", str(args.max_model_len),
                   "--kv-cache-memory-bytes", str(kv_bytes),
                   "--kv-policy", args.policy, "--budget", str(args.budget)]
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model).vocab_size
    jobs = make_jobs(args.requests, args.max_prompt, args.max_output, args.max_model_len,
                     vocab, args.seed)
    log = Path(args.log or tempfile.mkdtemp(prefix="soak-")) / "vllm.log"
    print(f"vllm serve log: {log}", file=sys.stderr)
    report = Report()
    with VllmServer(model, server_args, log) as server:
        started = time.perf_counter()
        rngs = [random.Random(args.seed * 1000 + i) for i in range(len(jobs))]
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            outcomes = list(pool.map(lambda pair: run_job(server, *pair), zip(jobs, rngs)))
        report.wall_s = time.perf_counter() - started
        metrics = wait_idle(server)
        report.failures = end_checks(server, metrics)
    for outcome in outcomes:
        report.requests += 2 if outcome.kind == "pair" else 1
        report.output_tokens += outcome.output_tokens
        if not outcome.ok:
            report.failures.append(outcome.detail)
        elif outcome.kind == "bad":
            report.rejected_400 += 1
    report.completed = sum(o.ok for o in outcomes if o.kind == "complete")
    report.streamed = sum(o.ok for o in outcomes if o.kind == "stream")
    report.aborted = sum(o.ok for o in outcomes if o.kind == "abort")
    report.pairs = sum(o.kind == "pair" for o in outcomes)
    report.pairs_identical = sum(o.ok for o in outcomes if o.kind == "pair")
    report.preemptions = metrics.get("vllm:num_preemptions_total", 0.0)
    report.compressions = metrics.get("vllm:kv_compress_compressions_total", 0.0)
    report.pages_freed = metrics.get("vllm:kv_compress_pages_freed_total", 0.0)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--requests", type=int, default=500, help="jobs (a pair sends two)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--policy", default="ems")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-tokens", type=int, default=4096,
                        help="KV cache size in full tokens (small, so that vLLM preempts)")
    # float32: a pair's two greedy runs cannot differ by rounding between batches.
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=None, help="directory for the server's log")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args()
    if args.kv_cache_tokens <= args.max_model_len:
        parser.error("--kv-cache-tokens must exceed --max-model-len (vLLM refuses a cache "
                     "that cannot hold one longest request)")
    if args.max_prompt + args.max_output > args.max_model_len:
        parser.error("--max-prompt + --max-output must fit in --max-model-len")
    report = soak(args)
    for name, value in asdict(report).items():
        if name != "failures":
            shown = f"{value:.1f}" if isinstance(value, float) else value
            print(f"{name:>16}  {shown}")
    for failure in report.failures:
        print(f"FAILED: {failure}")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
