"""`vllm-kvcompress train locret`: train, score held-out recall, write weights and card."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, MODELS
from vllm_kvcompress.scorers.weights import weights_path

BUDGETS = (64, 128, 256)


def add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="train a scorer (locret) on the frozen bundled model",
        description="Writes vllm_kvcompress/policies/weights/<scorer>-<model>.safetensors and "
                    "a JSON card next to it (or --out).")
    train.add_argument("scorer", choices=("locret",))
    train.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    train.add_argument("--steps", type=int, default=800, help="training examples (one per step)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--words", type=int, default=700, help="filler words per example")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--held-out", type=int, default=24, help="examples for the recall table")
    train.add_argument("--out", type=Path, default=None, help="weights file to write")


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vllm_kvcompress.bundled_models import model_path
    from vllm_kvcompress.training.locret import (FrozenModel, held_out_examples,
                                                 recall_at_budget, train_locret)

    frozen = FrozenModel(model_path(args.model))
    bar = tqdm(total=args.steps, desc=f"train {args.scorer}", unit="example")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    started = time.perf_counter()
    heads, losses = train_locret(frozen, args.steps, seed=args.seed, num_words=args.words,
                                 lr=args.lr, progress=progress)
    bar.close()
    seconds = time.perf_counter() - started
    examples = held_out_examples(frozen, args.held_out, args.seed + 1, args.words)
    recall = recall_at_budget(frozen, heads, examples, BUDGETS)
    every = max(1, len(losses) // 50)
    card = {
        "scorer": args.scorer, "model": args.model, "fingerprint": frozen.shape.fingerprint,
        "data": "Newton's Opticks (apache-tvm-ffi) with passkey/needle facts, seeded; "
                "labels: max attention from the question and answer (plain prose: last 64 tokens)",
        "seed": args.seed, "steps": args.steps, "words": args.words, "lr": args.lr,
        "train_seconds": round(seconds, 1),
        "loss_curve": [round(sum(losses[i:i + every]) / len(losses[i:i + every]), 4)
                       for i in range(0, len(losses), every)],
        "held_out_examples": args.held_out,
        "held_out_recall": {method: {str(b): round(v, 4) for b, v in per.items()}
                            for method, per in recall.items()},
    }
    out = args.out or weights_path(args.scorer, args.model)
    heads.save(out, card)
    print(f"wrote {out} ({seconds:.0f} s); held-out recall@budget:")
    for method, per in recall.items():
        print(f"  {method:10s} " + "  ".join(f"{b}: {v:.3f}" for b, v in per.items()))
    return 0
