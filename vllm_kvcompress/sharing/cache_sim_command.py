"""`vllm-kvcompress cache-sim` (every replacement policy on one trace, side by side) and
`vllm-kvcompress cache-trace` (write a synthetic trace)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from vllm_kvcompress.sharing.cache_sim import belady, replay
from vllm_kvcompress.sharing.predictors import (
    OnlinePredictor,
    flip_bits,
    perfect_phase_bits,
)
from vllm_kvcompress.sharing.replacement import LRU, Marking
from vllm_kvcompress.sharing.traces import (
    GENERATORS,
    TraceError,
    TraceRequest,
    read_trace,
    write_trace,
)

DEFAULT_FLIPS = (0.05, 0.1, 0.2, 0.3, 0.5)


def compare(trace: Sequence[TraceRequest], capacity: int,
            flips: Sequence[float] = DEFAULT_FLIPS, seed: int = 0) -> dict[str, float]:
    """Hit rates: lru, belady, perfect (discard bits from Belady), perfect-phase, flip-<eps>
    (perfect bits each inverted with probability eps), adversarial (every bit inverted),
    learned (OnlinePredictor), hints (the trace's own bits, when it has them); and
    `adversarial_misses_bound`, the guard's bound in misses, next to `adversarial_misses`."""
    base, perfect = belady(trace, capacity)
    rates = {"lru": replay(trace, capacity, LRU()).hit_rate, "belady": base.hit_rate}
    rates["perfect"] = replay(trace, capacity, Marking(capacity), perfect).hit_rate
    rates["perfect-phase"] = replay(trace, capacity, Marking(capacity, bits="phase"),
                                    perfect_phase_bits(trace, capacity)).hit_rate
    for eps in flips:
        bits = flip_bits(perfect, eps, seed)
        rates[f"flip-{eps:g}"] = replay(trace, capacity, Marking(capacity), bits).hit_rate
    adversarial = Marking(capacity)
    worst = replay(trace, capacity, adversarial, flip_bits(perfect, 1.0, seed))
    rates["adversarial"] = worst.hit_rate
    lru_misses = adversarial.shadow.misses
    rates["adversarial_misses"] = worst.misses
    longest = max(len(r.pages) for r in trace)
    rates["adversarial_misses_bound"] = adversarial.bound(lru_misses, longest)
    rates["learned"] = replay(trace, capacity, Marking(capacity),
                              predictor=OnlinePredictor(capacity)).hit_rate
    if all(r.discard is not None for r in trace):
        rates["hints"] = replay(trace, capacity, Marking(capacity),
                                [r.discard for r in trace]).hit_rate
    return rates


def format_table(rates: dict[str, float]) -> str:
    rows = [f"{name:<26} {value:.4f}" if isinstance(value, float) and value <= 1
            else f"{name:<26} {value:g}" for name, value in rates.items()]
    return "\n".join(["policy                     hit rate"] + rows)


def add_cache_parsers(commands) -> None:
    sim = commands.add_parser(
        "cache-sim", help="replay a prefix-cache lookup trace under every replacement policy",
        description="TRACE: JSONL, one request per line, {\"pages\": [\"<hash>\", ...]} "
                    "with optional \"discard\": [0|1, ...] hints (vllm serve --kv-trace "
                    "writes it; vllm-kvcompress cache-trace makes synthetic ones).")
    sim.add_argument("trace")
    sim.add_argument("--cache-pages", type=int, required=True, help="cache size in pages")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument("--flip", default=",".join(f"{f:g}" for f in DEFAULT_FLIPS),
                     help="comma-separated rates at which perfect bits are inverted")
    sim.add_argument("--seed", type=int, default=0)
    make = commands.add_parser("cache-trace", help="write a synthetic lookup trace (JSONL)")
    make.add_argument("kind", choices=sorted(GENERATORS))
    make.add_argument("output")
    make.add_argument("--seed", type=int, default=0)


def run_cache_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "cache-trace":
        trace = GENERATORS[args.kind](seed=args.seed)
        write_trace(args.output, trace)
        print(f"{len(trace)} requests written to {args.output}")
        return 0
    if args.cache_pages < 1:
        parser.error(f"--cache-pages {args.cache_pages}: must be >= 1")
    try:
        flips = [float(f) for f in args.flip.split(",") if f]
    except ValueError:
        parser.error(f"--flip {args.flip!r}: must be comma-separated numbers in [0, 1]")
    if any(not 0 <= f <= 1 for f in flips):
        parser.error(f"--flip {args.flip!r}: rates must be in [0, 1]")
    try:
        trace = read_trace(args.trace)
        rates = compare(trace, args.cache_pages, flips, args.seed)
    except FileNotFoundError:
        parser.error(f"no such file: {args.trace}")
    except (TraceError, ValueError) as exc:
        parser.error(f"{args.trace}: {exc}")
    print(json.dumps(rates) if args.json else format_table(rates))
    return 0
