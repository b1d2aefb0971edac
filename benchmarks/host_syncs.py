"""Host syncs per engine step on the compressed path, by policy and kind of step.

One in-process vLLM engine per policy (the bundled model, float32), a few prompts
decoded past several compressions; vllm_plugin/step_syncs.py counts, around the runtime's
plan_step and forward, the ops that would make a GPU step wait (value reads,
data-dependent shapes). Printed per kind of step (prefill, decode, compressing decode)
as the mean per step, with the sites that cause them.

On CPU the torch-path policies (those reading accumulated attention, and the second
tiers) attend with the torch reference kernels, which read sizes off tensors; on a GPU
their Triton kernels take the sizes from the host, so their kernel rows here overstate
a GPU step. The GPU path's own counts: every kernel through Triton, in its interpreter.

    python benchmarks/host_syncs.py --policies snapkv h2o mikv
    VLLM_KVCOMPRESS_KERNELS=triton TRITON_INTERPRET=1 python benchmarks/host_syncs.py \
        --policies h2o mikv --num-prompts 2 --output-len 20
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import argparse
import gc
from collections import Counter

from timing import print_table
from vllm import LLM, SamplingParams

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, model_path
from vllm_kvcompress.vllm_plugin.step_syncs import StepSyncs, counting_step_syncs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", default=["snapkv", "h2o", "mikv"])
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=40)
    return parser.parse_args()


def counted_run(policy: str, args) -> dict[str, list[StepSyncs]]:
    """{step kind: its steps} for one engine run."""
    with counting_step_syncs() as steps:
        llm = LLM(str(model_path(DEFAULT_MODEL)), enforce_eager=True, dtype="float32",
                  max_model_len=2048, seed=0,
                  additional_config={"kv_policy": policy, "budget": args.budget})
        prompts = [{"prompt_token_ids": list(range(100 + i, 400 + 37 * i))}
                   for i in range(args.num_prompts)]
        llm.generate(prompts, SamplingParams(max_tokens=args.output_len, temperature=0,
                                             ignore_eos=True), use_tqdm=False)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    by_kind: dict[str, list[StepSyncs]] = {}
    for step in steps:
        kind = "prefill" if step.num_tokens > args.num_prompts else \
            "compressing decode" if step.compresses else "decode"
        by_kind.setdefault(kind, []).append(step)
    return by_kind


def main() -> None:
    args = parse_args()
    rows = []
    for policy in args.policies:
        for kind, steps in counted_run(policy, args).items():
            total = Counter()
            for step in steps:
                total.update(step.sites)
            mean = sum(total.values()) / len(steps)
            where = ", ".join(f"{site} x{count / len(steps):g}"
                              for site, count in total.most_common(4))
            rows.append([policy, kind, len(steps), f"{mean:.1f}", where or "-"])
    print_table(["policy", "step", "steps", "syncs per step", "where (per step)"], rows)


if __name__ == "__main__":
    main()
