"""Training a trained scorer (Locret's retaining heads, Attention-Gate) on a frozen model,
and its held-out recall.

One step = one Example (training/examples.py) through the frozen model; every layer's
scorer regresses the log of its labels (SmoothL1, Locret's loss; for the gate, distillation
of the same attention labels), on a log scale because attention is heavy-tailed and only
the order matters for top-k. Seeded: the same seed gives the same examples, initial
weights and losses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_kvcompress.scorers.trained_scorer import SCORERS, ModelShape, TrainedScorer
from vllm_kvcompress.training.capture import CAPTURE_NAME, SNAPKV, Capture
from vllm_kvcompress.training.examples import Example, make_example

# Attention below this is "not needed" alike; it bounds the log target.
LABEL_FLOOR = 1e-4
# Sink tokens every policy keeps (streaming's default), left out of the recall.
SINKS = 4
# The held-out examples' random stream (the shipped cards were measured on it).
HELD_OUT_STREAM = "locret/held-out"


class FrozenModel:
    """The model in float32 with the capturing attention, and its tokenizer."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=CAPTURE_NAME).eval()
        self.model.requires_grad_(False)
        self.shape = ModelShape.of_config(self.model.config)

    def capture(self, heads: TrainedScorer | None, example: Example, snapkv: bool = False) -> Capture:
        """One forward over the example; heads: the scorer whose features to record (None:
        none); snapkv: also the snapkv policy's scores of the prompt."""
        capture = Capture(heads, example.region_start, self.shape.num_layers,
                          snapkv_end=example.prompt_len if snapkv else None)
        ids = torch.tensor([example.token_ids])
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None],
                       capture=capture, use_cache=False, logits_to_keep=1)
        return capture


def fit_input_scale(heads: TrainedScorer, capture: Capture) -> None:
    """Fix in_scale to 1 / std of each input feature on this capture (per layer, head)."""
    for layer, features in capture.features.items():
        heads.in_scale[layer] = 1.0 / features.std(dim=0).clamp_min(1e-3)


def capture_loss(heads: TrainedScorer, capture: Capture) -> torch.Tensor:
    """Mean over layers of SmoothL1(prediction, log(max(label, floor)))."""
    losses = [F.smooth_l1_loss(heads(layer, features),
                               capture.labels[layer].clamp_min(LABEL_FLOOR).log())
              for layer, features in capture.features.items()]
    return torch.stack(losses).mean()


def train_scorer(frozen: FrozenModel, kind: str, steps: int, seed: int = 0,
                 num_words: int = 700, lr: float = 2e-3, hidden: int | None = None,
                 progress: Callable[[int, float], None] | None = None) -> tuple[TrainedScorer, list[float]]:
    """Fit a fresh scorer of `kind` (scorers.SCORERS) for `steps` examples of about
    num_words filler words; hidden: its width (None: the kind's default). Returns the
    scorer and the loss of every step."""
    torch.manual_seed(seed)
    rng = random.Random(f"{seed}/{kind}/train")
    cls = SCORERS[kind]
    heads = cls(frozen.shape) if hidden is None else cls(frozen.shape, hidden=hidden)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    losses = []
    for step in range(steps):
        capture = frozen.capture(heads, make_example(frozen.tokenizer, rng, num_words))
        if step == 0:
            fit_input_scale(heads, capture)
        loss = capture_loss(heads, capture)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    return heads.eval(), losses


def held_out_examples(frozen: FrozenModel, count: int, seed: int, num_words: int) -> list[Example]:
    rng = random.Random(f"{seed}/{HELD_OUT_STREAM}")
    return [make_example(frozen.tokenizer, rng, num_words) for _ in range(count)]


def recall_at_budget(frozen: FrozenModel, heads: TrainedScorer, examples: Sequence[Example],
                     budgets: Sequence[int]) -> dict[str, dict[int, float]]:
    """Mean over examples, layers and KV heads of |top-B by method & top-B by label| / B,
    among the tokens before the region less the sinks and the last SNAPKV.window (which
    every policy keeps). Methods: the scorer (by its kind), key_norm (smallest keys),
    streaming (most recent), snapkv (window attention of the prompt's last queries,
    max-pooled)."""
    methods = (heads.kind, "key_norm", "streaming", "snapkv")
    sums = {m: {b: 0.0 for b in budgets} for m in methods}
    count = 0
    for example in examples:
        capture = frozen.capture(heads, example, snapkv=True)
        stop = example.region_start - SNAPKV.window if example.kind == "plain" else example.region_start
        candidates = slice(SINKS, stop)
        positions = torch.arange(example.region_start, dtype=torch.float32)
        for layer in capture.features:
            with torch.no_grad():
                scores = {
                    heads.kind: heads(layer, capture.features[layer]),
                    "key_norm": -capture.key_norms[layer],
                    "streaming": positions[:, None].expand_as(capture.labels[layer]),
                    "snapkv": capture.snapkv[layer],
                }
            label = capture.labels[layer][candidates]
            for budget in budgets:
                if budget >= label.shape[0]:
                    continue
                truth = _top_mask(label, budget)
                for method, score in scores.items():
                    hit = (_top_mask(score[candidates], budget) & truth).sum(0).float() / budget
                    sums[method][budget] += float(hit.mean())
            count += 1
    return {m: {b: v / max(count, 1) for b, v in per.items()} for m, per in sums.items()}


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[T, H] bool: each column's k highest."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(0, scores.topk(k, dim=0).indices, True)
