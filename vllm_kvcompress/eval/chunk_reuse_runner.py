"""Chunk reuse on a real model outside vLLM, through transformers: the quality reference.

Each request computes only the tokens its ReusePlan names (sharing/chunk_reuse.py) over a
cache of loaded chunk KV (eval/blend_attention.py), saves the chunks it computed in full to
the store (rotated back to position 0, with their attention statistics), then decodes
greedily. Without a store every token is computed: full recompute, the quality baseline.
Batch size 1, float32 by default.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_kvcompress.eval.blend_attention import (
    BLEND_ATTENTION,
    BlendCache,
    BlendLayer,
    ChunkStats,
    ProbeTaken,
)
from vllm_kvcompress.scorers.rope import rotate
from vllm_kvcompress.scorers.trained_scorer import ModelShape
from vllm_kvcompress.sharing.chunk_reuse import ReusePlan, placed, plan_reuse
from vllm_kvcompress.sharing.chunk_store import ChunkStore, StoredChunk

# CacheBlend's check layer: layer 0 runs over every token, layer 1's values are compared.
CHECK_LAYER = 1


@dataclass(frozen=True)
class ReuseSetting:
    """How a request reuses chunks. reuse False: compute everything (no store). recompute:
    fraction of each loaded chunk computed anew; selection: "attention", "deviation" or
    "random";
    fix_rope False loads keys unrotated (must fail); chunk_budget: fraction of a chunk's
    tokens stored, kept by chunk_score (sharing.chunk_store.CHUNK_SCORES)."""

    label: str
    reuse: bool = True
    recompute: float = 0.15
    selection: str = "attention"
    fix_rope: bool = True
    chunk_budget: float = 1.0
    chunk_score: str = "attention"


FULL_RECOMPUTE = ReuseSetting("full recompute", reuse=False)


@dataclass
class ReuseOutcome:
    """token_ids: the greedy answer; computed_positions [C] int64: the prompt positions
    computed; reused: prompt tokens loaded from the store; prefill_s: seconds of the
    prompt's forward; first_logits [V] float32: the logits after the prompt."""

    token_ids: list[int]
    text: str
    computed_positions: torch.Tensor
    reused: int
    prefill_s: float
    first_logits: torch.Tensor

    @property
    def computed(self) -> int:
        return self.computed_positions.numel()

    def computed_after(self, first: int) -> int:
        """Prompt tokens computed at positions >= first (those before: a prefix cache hit)."""
        return int((self.computed_positions >= first).sum())


class ChunkReuseRunner:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=BLEND_ATTENTION).eval()
        self.shape = ModelShape.of_config(self.model.config)
        self.model_name = Path(model_dir).name
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())

    def answer(self, token_ids: Sequence[int], spans: Sequence[tuple[int, int]],
               setting: ReuseSetting, store: ChunkStore | None, max_new_tokens: int,
               generator: torch.Generator | None = None) -> ReuseOutcome:
        """Prefill with reuse per `setting` (store None or setting.reuse False: none), save
        the chunks computed in full, decode greedily."""
        store = store if setting.reuse else None
        plan = plan_reuse(token_ids, spans, store, self.model_name, setting.recompute,
                          setting.selection, generator,
                          deviation=lambda hits: self._value_deviation(token_ids, hits))
        cache = self._loaded_cache(plan, setting.fix_rope)
        ids = torch.tensor(token_ids)
        rows = torch.tensor([plan.computed.numel() - 1])
        saving = store is not None and plan.missed
        if saving:
            cache.stats = ChunkStats([(start, end) for _, start, end in plan.missed],
                                     self.shape.num_layers)
            predictors = _predictor_rows(plan)
            rows = torch.cat([predictors, rows])
        began = time.perf_counter()
        all_logits = self._forward(cache, ids[plan.computed], plan.computed, rows)
        prefill_s = time.perf_counter() - began
        logits = all_logits[-1]
        if saving:
            surprisal = _surprisal(ids, plan, predictors, all_logits[:-1])
            self._save(store, plan, cache, surprisal, setting.chunk_budget, setting.chunk_score)
            cache.stats = None
        answer: list[int] = []
        first_logits = logits
        position = len(token_ids)
        while True:
            token = int(logits.argmax())
            answer.append(token)
            if token in self.eos_ids or len(answer) == max_new_tokens:
                break
            logits = self._forward(cache, torch.tensor([token]), torch.tensor([position]))[-1]
            position += 1
        return ReuseOutcome(answer, self.tokenizer.decode(answer, skip_special_tokens=True),
                            computed_positions=plan.computed, reused=plan.reused_tokens,
                            prefill_s=prefill_s, first_logits=first_logits)

    def _value_deviation(self, token_ids: Sequence[int],
                         hits: list[tuple[int, StoredChunk]]) -> list[torch.Tensor]:
        """Per hit [n]: the distance between its stored values at CHECK_LAYER and those of
        a fresh pass of the first layers over the whole prompt, summed over KV heads."""
        cache = self._empty_cache()
        cache.stop_at = CHECK_LAYER
        try:
            self._forward(cache, torch.tensor(token_ids), torch.arange(len(token_ids)))
        except ProbeTaken:
            pass
        fresh = cache.probe.float()                                            # [H, N, D]
        scores = []
        for start, chunk in hits:
            offsets = chunk.offsets[CHECK_LAYER]                                # [H, k]
            rows = (start + offsets)[..., None].expand(-1, -1, fresh.shape[-1])
            distance = (fresh.gather(1, rows) - chunk.values[CHECK_LAYER].float()).norm(dim=-1)
            scores.append(torch.zeros(chunk.length).index_add_(0, offsets.flatten(),
                                                               distance.flatten()))
        return scores

    def _empty_cache(self) -> BlendCache:
        shape = self.shape
        return BlendCache([BlendLayer.empty(shape.num_kv_heads, shape.head_size, self.model.dtype)
                           for _ in range(shape.num_layers)])

    def _loaded_cache(self, plan: ReusePlan, fix_rope: bool) -> BlendCache:
        cache = self._empty_cache()
        for index, layer in enumerate(cache.layers):
            for loaded in plan.loaded:
                layer.append(*placed(loaded, index, self.shape.rope_theta, fix_rope))
        return cache

    def _forward(self, cache: BlendCache, token_ids: torch.Tensor, positions: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [r, V] float32 of the given `rows` of the input (default: the last)."""
        with torch.inference_mode():
            output = self.model(input_ids=token_ids[None], position_ids=positions[None],
                                kv_blend=cache, use_cache=False,
                                logits_to_keep=1 if rows is None else rows)
        return output.logits[0].float()

    def _save(self, store: ChunkStore, plan: ReusePlan, cache: BlendCache,
              surprisal: list[torch.Tensor], budget: float, score: str) -> None:
        """Store each chunk computed in full: its fresh KV rotated back to 0, its stats."""
        stats = cache.stats
        for index, (key, start, end) in enumerate(plan.missed):
            keys, values = [], []
            for layer in cache.layers:
                slots = ((layer.positions[0] >= start) & (layer.positions[0] < end)).nonzero()[:, 0]
                slots = slots[layer.positions[0, slots].argsort()]
                chunk_keys = layer.keys[:, slots]                               # [H, n, D]
                back = torch.full((end - start,), -start)
                keys.append(rotate(chunk_keys.transpose(0, 1), back, self.shape.rope_theta)
                            .transpose(0, 1).to(layer.keys.dtype))
                values.append(layer.values[:, slots])
            heads = self.shape.num_kv_heads
            offsets = torch.arange(end - start).expand(self.shape.num_layers, heads, -1)
            chunk = StoredChunk(keys=torch.stack(keys), values=torch.stack(values),
                                offsets=offsets.contiguous(),
                                outside=stats.outside[index] / self.shape.num_layers,
                                received=stats.received[index], surprisal=surprisal[index])
            store.put(key, chunk.compressed(budget, score))


def _predictor_rows(plan: ReusePlan) -> torch.Tensor:
    """Rows [r] int64 of the computed tokens whose logits predict a token of a missed chunk
    (the token before each: positions start - 1 .. end - 2 that were computed)."""
    row_of = torch.full((int(plan.computed[-1]) + 1,), -1)
    row_of[plan.computed] = torch.arange(plan.computed.numel())
    wanted = torch.cat([torch.arange(max(start - 1, 0), end - 1) for _, start, end in plan.missed])
    rows = row_of[wanted]
    return rows[rows >= 0].unique()


def _surprisal(ids: torch.Tensor, plan: ReusePlan, rows: torch.Tensor,
               logits: torch.Tensor) -> list[torch.Tensor]:
    """Per missed chunk [n] float32: -log p of each token from the logits [r, V] of the
    predictor `rows`; inf for a token whose predecessor was not computed (the first)."""
    predicted = plan.computed[rows] + 1                                       # positions [r]
    nll = -torch.log_softmax(logits, dim=-1).gather(1, ids[predicted][:, None])[:, 0]
    chunks = []
    for _, start, end in plan.missed:
        surprisal = torch.full((end - start,), float("inf"))
        inside = (predicted >= start) & (predicted < end)
        surprisal[predicted[inside] - start] = nll[inside]
        chunks.append(surprisal)
    return chunks
