"""`vllm-kvcompress train locret|gate`: train, score held-out recall, write weights and card;
`vllm-kvcompress profile`: learn per-layer, per-head budget shares, write a --kv-config."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, MODELS
from vllm_kvcompress.config import PRESETS_DIR
from vllm_kvcompress.scorers.weights import weights_path

BUDGETS = (64, 128, 256)
# scorers.SCORERS' kinds, listed here so the CLI parser needs no torch import.
SCORER_KINDS = ("locret", "gate")


def add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="train a scorer (locret, gate) on the frozen bundled model",
        description="Writes vllm_kvcompress/policies/weights/<scorer>-<model>.safetensors and "
                    "a JSON card next to it (or --out).")
    train.add_argument("scorer", choices=SCORER_KINDS,
                       help="locret: Locret's retaining heads; gate: Attention-Gate")
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
    from vllm_kvcompress.training.trainer import (FrozenModel, held_out_examples,
                                                  recall_at_budget, train_scorer)

    frozen = FrozenModel(model_path(args.model))
    bar = tqdm(total=args.steps, desc=f"train {args.scorer}", unit="example")

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    started = time.perf_counter()
    heads, losses = train_scorer(frozen, args.scorer, args.steps, seed=args.seed,
                                 num_words=args.words, lr=args.lr, progress=progress)
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


def add_profile_parser(commands) -> None:
    profile = commands.add_parser(
        "profile", help="learn a per-layer, per-KV-head budget profile for any policy",
        description="Writes a --kv-config YAML (default configs/profile-<model>.yaml, usable "
                    "as `--kv-config profile-<model>`) whose kv_policy_args make any policy "
                    "split its budget by the learned shares (allocator: profile), and the "
                    "retention curves a --kv-quality target reads.")
    profile.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    profile.add_argument("--examples", type=int, default=48, help="examples to measure needs on")
    profile.add_argument("--budget", type=int, default=128,
                         help="the average budget per head the shares are best for")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--words", type=int, default=700, help="filler words per example")
    profile.add_argument("--held-out", type=int, default=16, help="examples for the check table")
    profile.add_argument("--out", type=Path, default=None, help="YAML file to write")


def run_profile(args: argparse.Namespace) -> int:
    import yaml
    from tqdm import tqdm

    from vllm_kvcompress.bundled_models import model_path
    from vllm_kvcompress.scorers.weights import load_scorer
    from vllm_kvcompress.training.profile import (MAX_SHARE, mass_curves, profile_examples,
                                                  retained_mass, retention_curves,
                                                  shares_for_budget)
    from vllm_kvcompress.training.trainer import FrozenModel

    if args.budget < 1:
        raise SystemExit(f"--budget={args.budget}: must be an integer >= 1")
    frozen = FrozenModel(model_path(args.model))
    examples = profile_examples(frozen, args.examples, args.seed, args.words)
    bar = tqdm(total=len(examples), desc="profile", unit="example")
    curves = mass_curves(frozen, examples, int(MAX_SHARE * args.budget),
                         progress=lambda: bar.update(1))
    bar.close()
    shares = shares_for_budget(curves, args.budget)
    held_out = profile_examples(frozen, args.held_out, args.seed + 1, args.words)
    check = retained_mass(frozen, held_out, shares, BUDGETS)
    # The shipped trained scorers' curves too (policy name -> its scorer), where they exist.
    scorers = {policy: load_scorer(str(weights_path(kind, args.model)), kind)
               for policy, kind in (("locret", "locret"), ("attention_gate", "gate"))
               if weights_path(kind, args.model).is_file()}
    curves = retention_curves(frozen, held_out, scorers)
    out = args.out or PRESETS_DIR / f"profile-{args.model}.yaml"
    header = (f"# Budget profile of {args.model} (fingerprint {frozen.shape.fingerprint}), "
              f"written by `vllm-kvcompress profile --budget {args.budget} --examples "
              f"{args.examples} --seed {args.seed}`:\n# per layer, each KV head's share of the "
              f"budget (mean 1), spread to keep the most attention mass at {args.budget}.\n"
              "# kv_quality_curves: per policy, the attention mass kept at each kept fraction "
              "of a prompt (held-out examples), read by --kv-quality / vllm_xargs kv_quality.\n"
              "# Use with any policy: vllm serve MODEL --kv-policy snapkv --budget 128 "
              f"--kv-config {out.stem}\n")
    body = {"kv_policy_args": {"allocator": "profile",
                               "head_shares": [[round(float(x), 3) for x in row] for row in shares]},
            "kv_quality_curves": curves}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(body, default_flow_style=None, width=100))
    print(f"wrote {out}; layer shares (mean over heads): "
          + " ".join(f"{float(x):.2f}" for x in shares.mean(1)))
    print("held-out share of attention mass kept (ranking, allocation):")
    for name, per in check.items():
        print(f"  {name:18s} " + "  ".join(f"{b}: {v:.3f}" for b, v in per.items()))
    print("retention curves (share of attention mass kept at a kept fraction of the prompt):")
    print("  " + " " * 16 + " ".join(f"{f:6.3f}" for f in curves["fractions"]))
    for name, curve in curves.items():
        if name != "fractions":
            print(f"  {name:16s}" + " ".join(f"{v:6.3f}" for v in curve))
    return 0
