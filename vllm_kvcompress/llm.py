"""`vllm_kvcompress.LLM`: vLLM's offline LLM with the compression settings as arguments,
whose `generate` plans the batch (sharing/batch_plan.py) before submitting it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import vllm
from vllm import SamplingParams

from vllm_kvcompress.config import resolve_settings
from vllm_kvcompress.sharing.batch_plan import BatchPlan, plan_batch
from vllm_kvcompress.sharing.group_prefix import with_leaders


class LLM(vllm.LLM):
    """`vllm.LLM(model, ...)` plus `kv_policy`, `budget`, ... (the flags' names).

    Example: `LLM(model, kv_policy="snapkv", budget=256).generate(prompts, params)`.
    Settings are validated here (one-line ValueError) and passed to vLLM as
    `additional_config`; everything else, progress bars included, is vLLM's.
    `generate` runs a batch in its prefix tree's order (outputs in the input order),
    with each request's group (`kv_group`) under `kv_scheduling="batch"`;
    `plan_batch=False` submits it as given. `group_prefix_rate=8` keeps each group's
    shared prefix once at 1/8 of its tokens (a leader request compresses it with the
    server's policy), read by the group's requests, which then run uncompressed.
    """

    def __init__(self, model: str, *, kv_policy: str | None = None, budget: int | None = None,
                 kv_window: int | None = None, kv_sinks: int | None = None,
                 kv_interval: int | None = None, kv_prefill_mode: str | None = None,
                 kv_cache_replacement: str | None = None, kv_trace: str | None = None,
                 kv_scheduling: str | None = None, kv_config: str | None = None,
                 **kwargs: Any) -> None:
        explicit = {"kv_policy": kv_policy, "budget": budget, "kv_window": kv_window,
                    "kv_sinks": kv_sinks, "kv_interval": kv_interval,
                    "kv_prefill_mode": kv_prefill_mode,
                    "kv_cache_replacement": kv_cache_replacement, "kv_trace": kv_trace,
                    "kv_scheduling": kv_scheduling}
        settings = resolve_settings(kv_config, explicit)
        additional = dict(kwargs.pop("additional_config", None) or {})
        additional.update(settings.to_additional_config())
        super().__init__(model, additional_config=additional, **kwargs)
        self.kv_settings = settings
        self.last_plan: BatchPlan | None = None

    def generate(self, prompts, sampling_params=None, *, plan_batch: bool = True,
                 group_prefix_rate: int | None = None, lora_request=None, priority=None,
                 **kwargs):
        token_ids = self._plannable(prompts) if plan_batch else None
        if token_ids is None:
            if group_prefix_rate is not None:
                raise ValueError("group_prefix_rate needs plan_batch=True and two or more "
                                 "prompts given as text or token ids")
            return super().generate(prompts, sampling_params, lora_request=lora_request,
                                    priority=priority, **kwargs)
        count = len(token_ids)
        params = _per_request(sampling_params or self.get_default_sampling_params(), count)
        cache = self.llm_engine.vllm_config.cache_config
        plan = plan_batch_for(token_ids, params, cache.block_size, cache.num_gpu_blocks)
        self.last_plan = plan
        hints = (self.kv_settings.kv_cache_replacement == "predicted"
                 and cache.enable_prefix_caching)
        groups = self.kv_settings.kv_scheduling == "batch"
        extras = [plan.extra_args(i, hints, groups) for i in range(count)]
        if group_prefix_rate is not None:
            return self._generate_with_leaders(token_ids, params, extras, plan,
                                               group_prefix_rate, lora_request, priority,
                                               **kwargs)
        params = [_with_extra(p, extra) for p, extra in zip(params, extras)]
        order = plan.order

        def reorder(values):
            return [values[i] for i in order] if isinstance(values, Sequence) else values

        outputs = super().generate([prompts[i] for i in order], reorder(params),
                                   lora_request=reorder(lora_request),
                                   priority=reorder(priority), **kwargs)
        in_input_order = [None] * count
        for index, output in zip(order, outputs):
            in_input_order[index] = output
        return in_input_order

    def _generate_with_leaders(self, token_ids, params, extras, plan: BatchPlan, rate: int,
                               lora_request, priority, **kwargs):
        """Each prefix group's prefix kept once at 1 / rate of its tokens by a leader
        request and read by its members uncompressed (sharing/group_prefix.py)."""
        settings = self.kv_settings
        if not settings.enabled or settings.kv_scheduling != "batch":
            raise ValueError("group_prefix_rate needs compression on (kv_policy, e.g. "
                             "snapkv) and kv_scheduling='batch'")
        submissions = with_leaders(token_ids, plan.order, self.llm_engine.vllm_config
                                   .cache_config.block_size, rate)
        leader = SamplingParams(max_tokens=1, temperature=0)

        def per_submission(values, default):
            if not isinstance(values, Sequence):
                return values
            return [default if s.index is None else values[s.index] for s in submissions]

        sub_params = [_with_extra(leader, s.extra) if s.index is None
                      else _with_extra(params[s.index], extras[s.index] | s.extra)
                      for s in submissions]
        outputs = super().generate([{"prompt_token_ids": s.prompt} for s in submissions],
                                   sub_params, lora_request=per_submission(lora_request, None),
                                   priority=per_submission(priority, 0), **kwargs)
        in_input_order = [None] * len(token_ids)
        for sub, output in zip(submissions, outputs):
            if sub.index is not None:
                in_input_order[sub.index] = output
        return in_input_order

    def _plannable(self, prompts) -> list[list[int]] | None:
        """Token ids of each prompt, or None where planning does not apply (one prompt,
        multimodal or embedding inputs)."""
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
            return None
        if len(prompts) < 2:
            return None
        tokenizer = self.get_tokenizer()
        token_ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                token_ids.append(tokenizer.encode(prompt))
            elif isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
                token_ids.append(list(prompt["prompt_token_ids"]))
            elif isinstance(prompt, dict) and set(prompt) == {"prompt"}:
                token_ids.append(tokenizer.encode(prompt["prompt"]))
            else:
                return None
        return token_ids


def plan_batch_for(token_ids: list[list[int]], params: list[SamplingParams], page_tokens: int,
                   cache_pages: int | None) -> BatchPlan:
    max_tokens = [p.max_tokens or 16 for p in params]
    return plan_batch(token_ids, max_tokens, page_tokens, cache_pages)


def _per_request(params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling_params for {count} prompts")
    return list(params)


def _with_extra(params: SamplingParams, extra: dict[str, Any]) -> SamplingParams:
    """A copy with the plan's `extra` in extra_args, where the caller set no value."""
    own = params.extra_args or {}
    if all(key in own for key in extra):
        return params
    params = params.clone()
    params.extra_args = {**extra, **own}
    return params
