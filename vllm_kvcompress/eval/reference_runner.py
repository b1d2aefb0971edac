"""Policies applied to a real model's KV cache outside vLLM, through transformers.

The model runs with the attention function of transformers_attention.py, whose cache is
one LayerStreams per layer: per-KV-head variable-length streams of keys after RoPE, with
token positions, accumulated attention and the query window, exactly the signals that
StreamBatch defines. Compression happens when cache/schedule.py's CompressionSchedule says
so (`full` prefill mode: after the whole prompt, then after decode steps), through
policy.compress and apply_selection, as inside vLLM; so the same prompt and policy give
the same kept positions on both paths.

Prefill does not depend on the policy, so a prompt is prefilled once and every
(policy, budget) decodes from its own fork of that state. Computes in float32 by default
(exact enough to compare kept sets with the vLLM path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_kvcompress.cache.schedule import CompressionSchedule
from vllm_kvcompress.eval.harness import OnAnswer
from vllm_kvcompress.eval.layer_streams import LayerStreams
from vllm_kvcompress.eval.memory import KVMemory, KVShape, held_memory
from vllm_kvcompress.eval.request_state import CompressionRecord, RequestState
from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.settings import Setting
from vllm_kvcompress.eval.transformers_attention import ATTENTION_NAME
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.budgets import attention_density
from vllm_kvcompress.policies.selection import NarrowKeyTier

# should_compress does not depend on the page size; any value works here.
BLOCK_SIZE = 16


@dataclass
class ActivePolicy:
    """A setting's policy object and its compression schedule."""

    setting: Setting
    policy: Policy
    schedule: CompressionSchedule

    @classmethod
    def from_setting(cls, setting: Setting) -> ActivePolicy:
        from vllm_kvcompress.policies.registry import make_policy

        policy = make_policy(setting.policy, setting.window, setting.sinks, **setting.options)
        schedule = CompressionSchedule(budget=setting.budget, interval=setting.interval,
                                       block_size=BLOCK_SIZE, prefill_mode="full")
        return cls(setting, policy, schedule)

    @property
    def window(self) -> int:
        """Queries the policy needs in its observation window (0 = none)."""
        return self.policy.query_window


@dataclass
class Generation:
    """Greedy output of one run; state: the request after its last step (kept positions:
    state.kept_positions(), and state.compressions for every compression)."""

    token_ids: list[int]
    text: str
    state: RequestState


@dataclass
class TeacherForcing:
    """Per target token: nll [K] float32 (negative log-likelihood of the target) and
    argmax [K] int64 (the model's greedy choice at that position); state: the request
    after the last target was scored."""

    nll: torch.Tensor
    argmax: torch.Tensor
    state: RequestState


class ReferenceRunner:
    """A causal LM from `model_dir` with per-head compressible streams (batch size 1)."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=ATTENTION_NAME).eval()
        config = self.model.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.group = config.num_attention_heads // config.num_key_value_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_size ** -0.5
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        # KV bytes are counted in the checkpoint's dtype, as vLLM would store them.
        self.kv_shape = KVShape.of_model(model_dir)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def prefill(self, token_ids: Sequence[int], window: int = 0, scorer=None) -> RequestState:
        """Run the whole prompt with full KV; keep the last `window` queries per head.
        scorer: a policy's write_scorer, whose scores the slots then hold."""
        layers = [LayerStreams.empty(self.num_kv_heads, self.group, self.head_size, window,
                                     capacity=len(token_ids), dtype=self.model.dtype)
                  for _ in range(self.num_layers)]
        state = RequestState(layers=layers, prompt_len=len(token_ids), num_tokens=0,
                             next_logits=torch.empty(0), scorer=scorer)
        self._forward(state, list(token_ids))
        state.layer_densities = torch.stack(
            [attention_density(layer.acc_scores, layer.lengths, self.num_kv_heads)
             for layer in layers], dim=1)
        return state

    def step(self, state: RequestState, token_id: int) -> None:
        """Feed one token at the next position (its original one: the count of tokens)."""
        self._forward(state, [token_id])

    def compress(self, state: RequestState, active: ActivePolicy) -> None:
        """Compress every layer's streams to the setting's budget; record kept positions."""
        policy = active.policy
        for index, layer in enumerate(state.layers):
            window = policy.query_window if policy.needs_window_queries else None
            batch = layer.stream_batch(index, self.num_layers, self.scale, window)
            if not policy.needs_accumulated and policy.write_scorer is None:
                batch.acc_scores.zero_()  # as vLLM, which does not track it then
            if policy.needs_layer_densities:
                batch.layer_densities = state.layer_densities
            layer.compact(batch, policy.compress(batch, active.setting.budget))
        state.last_compressed_at = state.num_tokens
        state.compressions.append(CompressionRecord(state.num_tokens, state.kept_positions(),
                                                    state.second_tier_positions()))

    def maybe_compress(self, state: RequestState, active: ActivePolicy | None) -> None:
        if active is not None and active.schedule.should_compress(
                state.num_tokens, state.last_compressed_at, state.prompt_len):
            self.compress(state, active)

    def generate(self, prefilled: RequestState, max_new_tokens: int,
                 active: ActivePolicy | None = None) -> Generation:
        """Greedy decode from a fork of `prefilled`; `active` None = full KV."""
        self._check_prefill(prefilled, active)
        state = prefilled.fork()
        self.maybe_compress(state, active)
        token_ids: list[int] = []
        while True:
            token = int(state.next_logits.argmax())
            token_ids.append(token)
            if token in self.eos_ids or len(token_ids) == max_new_tokens:
                break
            self.step(state, token)
            self.maybe_compress(state, active)
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Generation(token_ids=token_ids, text=text, state=state)

    def teacher_force(self, prefilled: RequestState, targets: Sequence[int],
                      active: ActivePolicy | None = None) -> TeacherForcing:
        """Feed `targets` one by one after `prefilled`, scoring each before it is fed."""
        self._check_prefill(prefilled, active)
        state = prefilled.fork()
        self.maybe_compress(state, active)
        nll, argmax = [], []
        for index, target in enumerate(targets):
            log_probs = torch.log_softmax(state.next_logits, dim=-1)
            nll.append(-log_probs[target])
            argmax.append(log_probs.argmax())
            if index + 1 < len(targets):
                self.step(state, target)
                self.maybe_compress(state, active)
        return TeacherForcing(nll=torch.stack(nll), argmax=torch.stack(argmax), state=state)

    def run(self, samples: Sequence[Sample], settings: Sequence[Setting],
            on_answer: OnAnswer) -> None:
        """The harness's runner interface: prefill each prompt once, decode every setting."""
        actives = [None if setting.dense else ActivePolicy.from_setting(setting) for setting in settings]
        window = max((active.window for active in actives if active is not None), default=0)
        for sample in samples:
            token_ids = self.tokenizer(sample.prompt).input_ids
            prefilled = {}  # one prefill per scorer the settings' slots need
            for setting, active in zip(settings, actives):
                scorer = _scorer(active)
                if id(scorer) not in prefilled:
                    prefilled[id(scorer)] = self.prefill(token_ids, window, scorer)
                generation = self.generate(prefilled[id(scorer)], sample.max_new_tokens, active)
                on_answer(sample, setting, generation.text, self.memory(generation.state, active))

    def memory(self, state: RequestState, active: ActivePolicy | None) -> KVMemory:
        """The KV bytes a request's streams hold, both tiers (see eval/memory.py)."""
        second = torch.stack([layer.second_tier_lengths() for layer in state.layers])
        full = torch.stack([layer.lengths for layer in state.layers])
        policy, budget = (None, None) if active is None else (active.policy, active.setting.budget)
        if policy is not None and isinstance(policy.second_tier_for(budget, self.head_size),
                                             NarrowKeyTier):
            full = full - second   # narrow slots are the first of each stream here
        return held_memory(full, second, state.num_tokens, policy, budget, self.kv_shape)

    def _forward(self, state: RequestState, token_ids: list[int]) -> None:
        positions = torch.arange(state.num_tokens, state.num_tokens + len(token_ids))
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([token_ids]), position_ids=positions[None],
                                kv_streams=state.layers, kv_scorer=state.scorer,
                                use_cache=False, logits_to_keep=1)
        state.num_tokens += len(token_ids)
        state.next_logits = output.logits[0, -1].float()

    @staticmethod
    def _check_prefill(state: RequestState, active: ActivePolicy | None) -> None:
        if state.scorer is not _scorer(active):
            raise ValueError("the prefill's slot scores are not those of this setting's "
                             "policy (pass its write_scorer to prefill)")
        held = state.layers[0].window_positions.shape[0]
        if active is not None and active.window > held:
            raise ValueError(f"{active.setting.label} needs {active.window} window queries; "
                             f"the prefill kept {held} (pass window= to prefill)")


def _scorer(active: ActivePolicy | None):
    """The trained scorer a setting's slots hold scores of (None: accumulated attention)."""
    return None if active is None else active.policy.write_scorer
