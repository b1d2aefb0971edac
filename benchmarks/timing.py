"""Shared by the benchmarks: command line, machine header, median timings, tables."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import time
from typing import Callable

import torch


# Every table printed, kept for --json.
TABLES: list[dict] = []


def setup(description: str) -> tuple[torch.device, torch.dtype]:
    """Parse --device, --threads and --json; return the device and the KV dtype on it."""
    device, dtype, _ = parse(argparse.ArgumentParser(description=description))
    return device, dtype


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton kernels run here: on CUDA, or in Triton's interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def parse(parser: argparse.ArgumentParser
          ) -> tuple[torch.device, torch.dtype, argparse.Namespace]:
    """`parser`'s options plus --device, --threads, --json and --smoke: the device, the KV
    dtype used on it, and every option's value."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes only (checks that the script runs)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write every table to FILE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.json:
        atexit.register(_write_json, args.json, machine(device))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32, args


def _write_json(path: str, header: str) -> None:
    with open(path, "w") as file:
        json.dump({"machine": header, "tables": TABLES}, file, indent=1)


def machine(device: torch.device) -> str:
    """The device, threads and load, for the header of a benchmark's output."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"device: {name}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f}")


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10,
              warmup: int = 2, before: Callable[[], object] | None = None) -> float:
    """Median milliseconds of fn() over `repeats` runs; `before` runs untimed before each."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A Markdown table (kept for --json)."""
    TABLES.append({"headers": headers, "rows": rows})
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row)
              + " |")
