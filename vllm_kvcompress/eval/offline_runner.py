"""Answer samples with offline vLLM (`vllm.LLM`), one engine per setting.

Settings reach the engine as `additional_config` (the plugin's keys), so this measures
the plugin inside vLLM.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

from vllm_kvcompress.eval.harness import OnAnswer
from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.settings import Setting

# Room for the longest prompt plus its answer, rounded up.
LENGTH_MARGIN = 64


class OfflineRunner:
    """model: a model path or name. engine_args: more keyword arguments for `LLM`
    (enforce_eager is on by default: compiling costs ~50 s per engine on CPU)."""

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None):
        self.model = model
        self.engine_args = {"enforce_eager": True, **(engine_args or {})}

    def run(self, samples: Sequence[Sample], settings: Sequence[Setting],
            on_answer: OnAnswer) -> None:
        from vllm import LLM, SamplingParams

        max_len = max(s.num_tokens + s.max_new_tokens for s in samples) + LENGTH_MARGIN
        params = [SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens) for s in samples]
        for setting in settings:
            llm = LLM(self.model, additional_config=setting.plugin_settings(),
                      **{"max_model_len": max_len, **self.engine_args})
            results = llm.generate([s.prompt for s in samples], params, use_tqdm=False)
            for sample, result in zip(samples, results):
                on_answer(sample, setting, result.outputs[0].text)
            del llm
            gc.collect()  # release the engine before starting the next one
