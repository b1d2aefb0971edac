"""Compression metrics on vLLM's /metrics, and a periodic INFO summary.

Compression runs in the worker process and page release in the engine core; with
compression on, engine_setup switches vLLM to prometheus_client's multiprocess mode (the
mode vLLM itself uses with several API servers), so the API server's /metrics shows the
counters of every process. Under tensor parallelism every rank compresses its own KV heads
in step with the others: only the first rank publishes (its heads stand for the layer).
"""

from __future__ import annotations

import functools
import time

from prometheus_client import Counter, Gauge
from vllm.logger import init_logger

logger = init_logger(__name__)

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
        self._gauge_clock, self._log_clock = Every(GAUGE_INTERVAL_S), Every(LOG_INTERVAL_S)
        self.compression_total_s = 0.0
        self.step_total_s = 0.0

    def add_compression(self, seconds: float, requests: int) -> None:
        self.compression_total_s += seconds
        if self.publish:
            self.compression_seconds.inc(seconds)
            self.compressions.inc(requests)

    def add_step(self, seconds: float) -> None:
        self.step_total_s += seconds
        if self.publish:
            self.step_seconds.inc(seconds)

    def compression_share(self) -> float:
        """Compression time / step time since the process started."""
        return self.compression_total_s / self.step_total_s if self.step_total_s else 0.0

    def observe(self, seen: int, kept: float, bytes_seen: int, bytes_kept: int) -> None:
        self.tokens_seen.set(seen)
        self.tokens_kept.set(kept)
        self.compression_ratio.set(seen / kept if kept else 1.0)
        self.bytes_seen.set(bytes_seen)
        self.bytes_kept.set(bytes_kept)

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


@functools.cache
def pages_freed_counter() -> Counter:
    return _metric(Counter, "vllm:kv_compress_pages_freed",
                   "Pages returned to vLLM's pool when compressed requests shrank")


@functools.cache
def _metric(kind, name: str, documentation: str, **kwargs):
    # One instance per process: prometheus_client refuses a second registration.
    return kind(name, documentation, **kwargs)
