"""Compression metrics on vLLM's /metrics, and a periodic INFO summary.

Compression runs in the worker process and page release in the engine core; with
compression on, `collect_engine_processes` has those processes write their metrics to files
that the API server's /metrics reads next to vLLM's own. Under tensor parallelism every
rank compresses its own KV heads in step with the others: only the first rank publishes
(its heads stand for the layer).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector
from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's handlers and level

# The directory where engine processes write their metrics for the API server to read.
METRICS_DIR_ENV = "KVCOMPRESS_METRICS_DIR"  # not VLLM_*: vLLM warns of ones it does not know
_collecting_pid: int | None = None  # the API server process that reads them
_keep_until_exit: list[tempfile.TemporaryDirectory] = []

LOG_INTERVAL_S = 10.0
GAUGE_INTERVAL_S = 0.5


class CompressionMetrics:
    """Worker-side counters and gauges (one set per process); publish=False keeps only the
    in-process totals (tensor-parallel ranks after the first)."""

    def __init__(self, publish: bool = True):
        self.publish = publish
        self.compressions = _metric(Counter, "vllm:kv_compress_compressions",
                                    "Request compressions (one per request and step)")
        self.compression_seconds = _metric(Counter, "vllm:kv_compress_compression_seconds",
                                           "Time spent scoring, selecting and compacting")
        self.step_seconds = _metric(Counter, "vllm:kv_compress_step_seconds",
                                    "Time of the model steps that ran with compression on")
        self.tokens_seen = _metric(Gauge, "vllm:kv_compress_tokens_seen",
                                   "Tokens of the running requests (what full KV would hold)",
                                   multiprocess_mode="livesum")
        self.tokens_kept = _metric(Gauge, "vllm:kv_compress_tokens_kept",
                                   "Tokens kept per stream, summed over running requests",
                                   multiprocess_mode="livesum")
        self.compression_ratio = _metric(Gauge, "vllm:kv_compress_ratio",
                                         "tokens_seen / tokens_kept of the running requests",
                                         multiprocess_mode="max")
        self.bytes_seen = _metric(Gauge, "vllm:kv_compress_bytes_seen",
                                  "KV bytes full precision would hold for the running requests",
                                  multiprocess_mode="livesum")
        self.bytes_kept = _metric(Gauge, "vllm:kv_compress_bytes_kept",
                                  "KV bytes the running requests' streams hold (both tiers)",
                                  multiprocess_mode="livesum")
        self.quality_requests = _metric(Counter, "vllm:kv_compress_quality_requests",
                                        "Requests whose budget a kv_quality target chose")
        self.quality_budget = _metric(Counter, "vllm:kv_compress_quality_budget",
                                      "Sum of the budgets kv_quality targets chose "
                                      "(divide by quality_requests for the mean)")
        self._gauge_clock, self._log_clock = Every(GAUGE_INTERVAL_S), Every(LOG_INTERVAL_S)
        self._idle = False
        self.compression_total_s = 0.0
        self.step_total_s = 0.0

    def add_compression(self, seconds: float, requests: int) -> None:
        self.compression_total_s += seconds
        if self.publish:
            self.compression_seconds.inc(seconds)
            self.compressions.inc(requests)

    def add_quality_budget(self, budget: int) -> None:
        logger.debug("kv_quality chose budget %d", budget)
        if self.publish:
            self.quality_requests.inc()
            self.quality_budget.inc(budget)

    def add_step(self, seconds: float) -> None:
        self.step_total_s += seconds
        if self.publish:
            self.step_seconds.inc(seconds)

    def compression_share(self) -> float:
        """Compression time / step time since the process started."""
        return self.compression_total_s / self.step_total_s if self.step_total_s else 0.0

    def observe(self, seen: int, kept: float, bytes_seen: int, bytes_kept: int) -> None:
        self._idle = seen == 0
        self.tokens_seen.set(seen)
        self.tokens_kept.set(kept)
        self.compression_ratio.set(seen / kept if kept else 1.0)
        self.bytes_seen.set(bytes_seen)
        self.bytes_kept.set(bytes_kept)

    def observe_idle(self) -> None:
        """Nothing running: 0 tokens and bytes, ratio 1 (written once per idle spell)."""
        if self.publish and not self._idle:
            self.observe(0, 0.0, 0, 0)

    def gauges_due(self) -> bool:
        return self.publish and self._gauge_clock.due()

    def log_due(self) -> bool:
        return self._log_clock.due()


class Every:
    """`due()` is True once `interval_s` has passed since it last was (or since creation)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return True


def collect_engine_processes() -> None:
    """In the API server, before the engine starts: /metrics shows the engine and worker
    processes' metrics next to all of vLLM's own.

    Compression counts in the engine core and the workers. They write their metrics to files
    in a directory named by METRICS_DIR_ENV (see `_metric`), which one collector on the
    default registry reads. PROMETHEUS_MULTIPROC_DIR itself must stay unset here: with it,
    vLLM and its instrumentator serve the files alone and drop the API server's metrics.
    Where it is set (by the user, or by vLLM for several API servers, which it starts as
    processes of their own) every process writes files and vLLM's registry reads them all.
    """
    global _collecting_pid
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or METRICS_DIR_ENV in os.environ:
        return
    directory = tempfile.TemporaryDirectory(prefix="vllm-kvcompress-metrics-")
    _keep_until_exit.append(directory)
    os.environ[METRICS_DIR_ENV] = directory.name
    _collecting_pid = os.getpid()
    MultiProcessCollector(REGISTRY, path=directory.name)


def _write_to_shared_files() -> None:
    """In an engine process started by a collecting API server: build metrics on files.

    prometheus_client picks in-memory or file-backed values when it is imported, long
    before this runs; picking again after setting its variable gives the metrics built from
    now on file-backed values (no engine-side metric of vLLM's is built later).
    """
    directory = os.environ.get(METRICS_DIR_ENV)
    in_memory = prometheus_values.ValueClass is prometheus_values.MutexValue
    if directory is None or os.getpid() == _collecting_pid or not in_memory:
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    prometheus_values.ValueClass = prometheus_values.get_value_class()


@functools.cache
def pages_freed_counter() -> Counter:
    return _metric(Counter, "vllm:kv_compress_pages_freed",
                   "Pages returned to vLLM's pool when compressed requests shrank")


@functools.cache
def _metric(kind, name: str, documentation: str, **kwargs):
    # One instance per process: prometheus_client refuses a second registration.
    _write_to_shared_files()
    return kind(name, documentation, **kwargs)
