"""Drive an in-process vLLM engine step by step and read its own counters."""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from vllm import LLM, SamplingParams

from vllm_kvcompress.vllm_plugin.engine_setup import BLOCK_SIZE

# float32: the compressed path attends with its own kernels; in bf16 rounding differences
# against vLLM's CPU kernels could flip near-tied greedy tokens.
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=4096, seed=0)


@contextmanager
def started_llm(model_dir, kv_tokens: int | None = None, llm_class=LLM, **kwargs):
    """An in-process engine, shut down on exit even when the test fails (a second engine
    in the same process needs the first one's distributed state torn down).

    kv_tokens sizes its KV cache (same bytes per token with or without compression)."""
    if kv_tokens is not None:
        compressed = kwargs.get("additional_config", {}).get("kv_policy", "none") != "none"
        block_size = BLOCK_SIZE if compressed else 128  # ours vs vLLM's CPU default
        kwargs["num_gpu_blocks_override"] = kv_tokens // block_size
    llm = llm_class(str(model_dir), **{**ENGINE_ARGS, **kwargs})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def engine_core(llm):
    """The EngineCore of an in-process LLM (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core


def scheduler(llm):
    return engine_core(llm).scheduler


def block_pool(llm):
    return scheduler(llm).kv_cache_manager.block_pool


def all_pages_free(llm) -> bool:
    """Every page of vLLM's pool is free again, but its null block (never handed out)."""
    pool = block_pool(llm)
    return pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


@dataclass
class RunStats:
    outputs: dict[str, list[int]] = field(default_factory=dict)
    # Most requests past their prompt (decoding) in one step: the concurrency KV allows.
    max_decoding: int = 0
    preemptions: int = 0
    aborted: list[str] = field(default_factory=list)
    # Prompt tokens each request found in vLLM's prefix cache.
    cached_tokens: dict[str, int] = field(default_factory=dict)


def prompt_of_length(tokenizer, num_tokens: int, seed: int) -> list[int]:
    """A deterministic natural-looking prompt of exactly `num_tokens` token ids."""
    rng = random.Random(seed)
    words = ("the river city night green stone music window paper light summer train "
             "market garden letter silver quiet morning forest ocean").split()
    text = " ".join(rng.choice(words) for _ in range(num_tokens * 2))
    return tokenizer(text).input_ids[:num_tokens]


def run(llm, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
        abort_after_steps: dict[int, int] | None = None,
        after_step: Callable[[int], None] | None = None) -> RunStats:
    """Add every prompt (token ids), step the engine to completion, count as it goes.

    abort_after_steps: {prompt index: step} aborts that request at that step.
    after_step: called with the step number after every step.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    engine = llm.llm_engine
    ids = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
           for i, (p, sp) in enumerate(zip(prompts, params))]
    aborts = {step: ids[i] for i, step in (abort_after_steps or {}).items()}
    stats = RunStats()
    sched = scheduler(llm)
    step = 0
    while engine.has_unfinished_requests():
        if step in aborts:
            engine.abort_request([aborts[step]], internal=True)
            stats.aborted.append(aborts[step])
        for output in engine.step():
            if output.finished and output.outputs[0].finish_reason != "abort":
                stats.outputs[output.request_id] = list(output.outputs[0].token_ids)
                stats.cached_tokens[output.request_id] = output.num_cached_tokens or 0
        decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        stats.max_decoding = max(stats.max_decoding, decoding)
        if after_step is not None:
            after_step(step)
        step += 1
    stats.preemptions = getattr(sched, "num_preemptions", 0)
    return stats
