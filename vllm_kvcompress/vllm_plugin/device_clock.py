"""Time of code regions as the device sees them, without making the host wait for it.

On CPU a region's time is the wall time around it. On a GPU the host only queues the work,
so a region is a pair of CUDA events; their time is read once both have completed (the
next step at the latest), never by waiting on them.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


class DeviceClock:
    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, Callable]] = []

    def start(self):
        """A mark to pass to `stop`."""
        if not self.cuda:
            return time.perf_counter()
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        return mark

    def stop(self, started, report: Callable[[float], None]) -> None:
        """report(seconds since `started`): now on CPU, from `collect` on a GPU."""
        if not self.cuda:
            report(time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((started, end, report))

    def collect(self) -> None:
        """Report the regions whose events have completed."""
        waiting = []
        for started, end, report in self._pending:
            if end.query():
                report(started.elapsed_time(end) / 1e3)
            else:
                waiting.append((started, end, report))
        self._pending = waiting
