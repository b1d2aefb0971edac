"""Start and stop a real `vllm serve` process (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# CPU machines: the default KV-memory check reads the NUMA node size and refuses to start
# on small nodes, and compiling costs ~50 s per start; set both unless the caller did.
CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_DEFAULT_ARGS = ("--enforce-eager",)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` console script of this environment."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else ["vllm"]


class VllmServer:
    """`vllm serve MODEL ARGS...` on a free local port, as a context manager.

    The server's output goes to `log_path`; on exit it is stopped with SIGINT (vLLM's
    clean shutdown) and killed if it does not stop in time.
    """

    def __init__(self, model: str | Path, args: list[str], log_path: Path,
                 env: dict[str, str] | None = None, startup_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*vllm_command(), "serve", str(model), "--port", str(self.port),
                        "--host", "127.0.0.1", *args]
        self.log_path = log_path
        self.env = {**os.environ, **CPU_DEFAULT_ENV, **(env or {})}
        if "--kv-cache-memory-bytes" in args:
            # vLLM lets VLLM_CPU_KVCACHE_SPACE (whole GiB) override the flag.
            self.env.pop("VLLM_CPU_KVCACHE_SPACE")
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # so stop() can signal the engine processes too
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self.process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def post(self, path: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """POST JSON to the server; returns the decoded reply (raises HTTPError on 4xx/5xx)."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def get_text(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:
            return response.read().decode()

    def metrics(self) -> dict[str, float]:
        """/metrics as {metric name: the sum of its samples over all label sets}."""
        totals: dict[str, float] = {}
        for line in self.get_text("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("{", 1)[0].split(" ", 1)[0], float(line.split()[-1])
                totals[name] = totals.get(name, 0.0) + value
        return totals
