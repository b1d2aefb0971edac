"""Where a CPU's time goes for one long prompt through `vllm serve`: dtype, threads, ISA.

One server per setting (the card's `--kv-policy ems --budget 256`); after a warm-up, one
prompt of --prompt-tokens token ids with 16 output tokens, timed end to end, once with the
card's policy and once with `kv_policy: none` (stock attention). Settings:
- dtype: bfloat16 or float32;
- threads: vLLM's default binding (it reserves cores for the engine's other work: one of
  two on a 2-core machine) or every core for the model (VLLM_CPU_NUM_OF_RESERVED_CPU=0);
- isa: this CPU, or AVX2 only for PyTorch and oneDNN (ATEN_CPU_CAPABILITY=avx2,
  ONEDNN_MAX_CPU_ISA=AVX2): an emulation of a CPU without AVX-512 for the matrix
  products, which dominate; vLLM's own kernels keep their AVX-512 paths.

    python benchmarks/cpu_settings.py --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
ALL_CORES_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
SETTINGS = {  # name: (dtype, env)
    "bf16": ("bfloat16", {}),
    "fp32": ("float32", {}),
    "bf16 all-cores": ("bfloat16", ALL_CORES_ENV),
    "fp32 all-cores": ("float32", ALL_CORES_ENV),
    "bf16 avx2": ("bfloat16", AVX2_ENV),
    "fp32 avx2": ("float32", AVX2_ENV),
    "fp32 avx2 all-cores": ("float32", {**AVX2_ENV, **ALL_CORES_ENV}),
}


def timed(server: VllmServer, prompt: list[int], xargs: dict) -> float:
    started = time.perf_counter()
    server.post("/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 16,
                                    "ignore_eos": True, "vllm_xargs": xargs})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = model_path(DEFAULT_MODEL)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(3)]
    rows = []
    for name in args.settings.split(","):
        dtype, env = SETTINGS[name]
        serve_args = [*CPU_DEFAULT_ARGS, "--dtype", dtype, "--served-model-name", "m",
                      "--max-model-len", str(args.prompt_tokens + 64),
                      "--no-enable-prefix-caching", "--kv-policy", "ems", "--budget", "256"]
        log = Path(tempfile.mkdtemp(prefix="cpu-settings-")) / "vllm.log"
        with VllmServer(model, serve_args, log, env=env) as server:
            timed(server, prompts[0][:256], {})  # warm-up
            ems = timed(server, prompts[1], {})
            stock = timed(server, prompts[2], {"kv_policy": "none"})
        rows.append({"setting": name, "ems_s": round(ems, 2), "stock_attention_s": round(stock, 2)})
        print(f"{name:>28}  ems {ems:6.1f} s   kv_policy none {stock:6.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
