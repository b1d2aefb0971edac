"""`vllm-kvcompress eval tasks|perplexity`: arguments and what they run."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, MODELS
from vllm_kvcompress.cpu_features import default_dtype


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="measure quality: synthetic tasks or perplexity")
    checks = evaluate.add_subparsers(dest="check", required=True)

    tasks = checks.add_parser("tasks", help="accuracy on synthetic long-context tasks",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common_arguments(tasks)
    tasks.add_argument("--runner", choices=("reference", "endpoint", "offline"), default="reference",
                       help="reference: transformers with policies applied outside vLLM; "
                            "endpoint: an OpenAI-compatible server; offline: vllm.LLM")
    tasks.add_argument("--tasks", default="passkey,needle_single",
                       help="comma-separated task names, or 'all'")
    tasks.add_argument("--lengths", default="2048,4096", help="prompt lengths in tokens")
    tasks.add_argument("--samples", type=int, default=5, help="prompts per task and length (depths swept)")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--tokenizer", help="tokenizer measuring prompt lengths (None: the model's)")
    tasks.add_argument("--url", help="endpoint runner: server base URL, e.g. http://127.0.0.1:8000")
    tasks.add_argument("--served-model", help="endpoint runner: model name (None: the server's first)")
    tasks.add_argument("--xargs", choices=("auto", "always", "never"), default="auto",
                       help="endpoint runner: when to send the setting as vllm_xargs")
    tasks.add_argument("--concurrency", type=int, default=4, help="endpoint runner: requests in flight")

    perplexity = checks.add_parser("perplexity", help="teacher-forced perplexity and greedy "
                                   "agreement on a long text (reference runner)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common_arguments(perplexity)
    perplexity.add_argument("--text", type=Path, help="text file (None: the GPL-3 text in "
                            "/usr/share/common-licenses)")
    perplexity.add_argument("--prefix", type=int, default=2048, help="prompt tokens")
    perplexity.add_argument("--scored", type=int, default=256, help="tokens scored after the prompt")


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a bundled model ({', '.join(MODELS)}) or a Hugging Face folder")
    parser.add_argument("--policies", default="none,all",
                        help="comma-separated; 'none' = dense, 'all' = every implemented policy; "
                             "a policy may carry options: mikv:key_bits=4:lowbit_budget=512")
    parser.add_argument("--policy-args", type=json.loads, default={}, metavar="JSON",
                        help="options (kv_policy_args) for every listed policy, e.g. "
                             "'{\"allocator\": \"adakv\"}'; a policy's own win")
    parser.add_argument("--budgets", default="64,128,256,512", help="comma-separated budgets")
    parser.add_argument("--memory-fraction", default=None, metavar="F[,F...]",
                        help="instead of --budgets: each policy's budget such that its KV bytes "
                             "are this share of full precision at each prompt length "
                             "(e.g. 0.125,0.25); low-bit tiers count by their packed size")
    parser.add_argument("--kv-quality", default=None, metavar="Q[,Q...]",
                        help="instead of --budgets: kv_quality targets in (0, 1]; the budget "
                             "per prompt length comes from --kv-config's kv_quality_curves "
                             "(the endpoint runner sends kv_quality to the server instead)")
    parser.add_argument("--kv-config", default=None, metavar="FILE.yaml",
                        help="a profile (`vllm-kvcompress profile`) whose kv_quality_curves "
                             "--kv-quality reads (a path or a name from configs/)")
    parser.add_argument("--window", type=int, help="protected recent tokens (None: the policy's default)")
    parser.add_argument("--sinks", type=int, help="protected first tokens (None: the policy's default)")
    parser.add_argument("--interval", type=int, default=16, help="decode tokens between compressions")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="compute type of the reference and offline runners: float32 "
                             "(results comparable across machines, and the fast type where "
                             "bf16 is emulated) or auto (bf16 if this CPU computes it natively)")
    parser.add_argument("--threads", type=int, default=1,
                        help="reference runner's torch threads; decode and compression are many "
                             "small ops, which more threads slow down on a busy machine")
    parser.add_argument("--out", type=Path, default=Path("eval-results"),
                        help="folder for the JSON results and the plot")


def run_eval(args: argparse.Namespace) -> int:
    if args.dtype == "auto":
        args.dtype = default_dtype()
    if args.check == "tasks":
        return run_tasks(args)
    return run_perplexity(args)


def run_tasks(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from vllm_kvcompress.eval.harness import evaluate
    from vllm_kvcompress.eval.memory import KVShape
    from vllm_kvcompress.eval.plot import plot_accuracy
    from vllm_kvcompress.eval.results import format_table, summarize, write_results
    from vllm_kvcompress.eval.tasks import TASKS, make_samples

    model = resolve_model(args.model)
    task_names = list(TASKS) if args.tasks == "all" else _split(args.tasks)
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise SystemExit(f"vllm-kvcompress eval: unknown task(s) {', '.join(unknown)}; "
                         f"known: {', '.join(TASKS)}")
    settings = _settings(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model)
    samples = make_samples(task_names, [int(n) for n in _split(args.lengths)], args.samples,
                           args.seed, lambda text: len(tokenizer(text).input_ids))
    settings = _feasible(settings, samples, KVShape.of_model(model))
    runner = _runner(args, model)
    config = {"command": " ".join(sys.argv), "model": str(model), "runner": args.runner,
              "tasks": task_names, "samples": args.samples, "seed": args.seed,
              "settings": [setting.label for setting in settings], "dtype": args.dtype,
              "threads": args.threads}
    results_path, started = args.out / "results.json", time.monotonic()
    records = []

    def on_record(record) -> None:
        records.append(record)
        print(f"[{time.monotonic() - started:7.0f}s] {record.task} {record.target_length} "
              f"#{record.index} {record.setting}: {record.score:.2f} {record.output!r}",
              file=sys.stderr, flush=True)
        write_results(results_path, config, records)  # partial results survive a crash

    def on_skip(setting, length, reason) -> None:
        print(f"skipped {setting.label} at {length} tokens: {reason}", file=sys.stderr)

    evaluate(runner, samples, settings, on_record, KVShape.of_model(model), on_skip)
    config["seconds"] = round(time.monotonic() - started)
    write_results(results_path, config, records)
    summary = summarize(records)
    plot_accuracy(summary, args.out / "accuracy.png", f"{Path(str(model)).name}, {args.runner} runner")
    print(format_table(summary))
    print(f"\nresults: {results_path}\nplot: {args.out / 'accuracy.png'}")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from vllm_kvcompress.eval.long_text import read_long_text
    from vllm_kvcompress.eval.perplexity import format_perplexity_table, perplexity_check

    runner = _reference_runner(args, resolve_model(args.model))
    token_ids = runner.tokenizer(read_long_text(args.text)).input_ids
    if len(token_ids) < args.prefix + args.scored:
        raise SystemExit(f"vllm-kvcompress eval: the text has {len(token_ids)} tokens, fewer than "
                         f"--prefix + --scored = {args.prefix + args.scored}")
    settings = [setting.at_length(args.prefix, runner.kv_shape) for setting in _settings(args)]
    started = time.monotonic()
    results = perplexity_check(
        runner, token_ids[:args.prefix + args.scored], args.prefix, settings,
        on_result=lambda r: print(f"[{time.monotonic() - started:7.0f}s] {r.setting}: perplexity "
                                  f"{r.perplexity:.3f}, agreement {r.agreement:.3f}",
                                  file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "perplexity.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv),
                                "results": [asdict(r) for r in results]}, indent=1))
    print(format_perplexity_table(results))
    print(f"\nresults: {path}")
    return 0


def resolve_model(name_or_path: str) -> Path | str:
    """A bundled model's folder (built on first use), else the argument unchanged."""
    if name_or_path in MODELS:
        from vllm_kvcompress.bundled_models import model_path

        return model_path(name_or_path, log=lambda line: print(line, file=sys.stderr))
    return name_or_path


def _feasible(settings: list, samples: list, shape: KVShape) -> list:
    """The settings some prompt length can run: a memory fraction that no budget reaches at
    any length is left out with a note (a sweep may ask for more than every policy can
    give); if that leaves nothing, refuse."""
    feasible, problems = [], []
    for setting in settings:
        errors = []
        for sample in samples:
            try:
                setting.at_length(sample.num_tokens, shape)
            except ValueError as error:
                errors.append(str(error))
        if len(errors) < len(samples):
            feasible.append(setting)
        else:
            problems.append(f"{setting.label}: {errors[0]}")
            print(f"vllm-kvcompress eval: left out {problems[-1]}", file=sys.stderr)
    if not feasible:
        raise SystemExit(f"vllm-kvcompress eval: {problems[0]}")
    return feasible


def _settings(args: argparse.Namespace):
    from vllm_kvcompress.eval.settings import settings_grid
    from vllm_kvcompress.policies.registry import implemented_policies, make_policy

    policies: list[tuple[str, dict]] = []
    for spec in _split(args.policies):
        name, options = parse_policy(spec)
        names = [p for p in implemented_policies() if p != "none"] if name == "all" else [name]
        policies += [(each, options) for each in names]
    fractions = [float(f) for f in _split(args.memory_fraction or "")]
    if any(not 0 < f <= 1 for f in fractions):
        raise SystemExit(f"vllm-kvcompress eval: --memory-fraction={args.memory_fraction}: "
                         "each must be in (0, 1]")
    qualities = [float(q) for q in _split(args.kv_quality or "")]
    if any(not 0 < q <= 1 for q in qualities):
        raise SystemExit(f"vllm-kvcompress eval: --kv-quality={args.kv_quality}: each must be in (0, 1]")
    curves = None
    if qualities:
        from vllm_kvcompress.config import KVCompressConfigError, load_preset

        try:
            curves = load_preset(args.kv_config).get("kv_quality_curves") if args.kv_config else None
        except KVCompressConfigError as error:
            raise SystemExit(f"vllm-kvcompress eval: {error}") from None
        if curves is None:
            raise SystemExit("vllm-kvcompress eval: --kv-quality needs --kv-config with "
                             "kv_quality_curves (written by `vllm-kvcompress profile`)")
    settings = settings_grid(policies, [int(b) for b in _split(args.budgets)], args.window,
                             args.sinks, args.interval, args.policy_args, fractions,
                             qualities, curves)
    for setting in settings:   # a bad option fails here, naming it, not mid-run
        if not setting.dense:
            try:
                make_policy(setting.policy, setting.window, setting.sinks, **setting.options)
            except ValueError as error:
                raise SystemExit(f"vllm-kvcompress eval: {error}") from None
    return settings


def parse_policy(spec: str) -> tuple[str, dict]:
    """'mikv:key_bits=4:lowbit_budget=null' -> ('mikv', {'key_bits': 4, 'lowbit_budget': None});
    values are read as YAML scalars (numbers, true/false, null, [lists])."""
    import yaml

    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise SystemExit(f"vllm-kvcompress eval: --policies entry {spec!r}: options are "
                             "written name:key=value[:key=value...]")
        options[key] = yaml.safe_load(value)
    return name, options


def _runner(args: argparse.Namespace, model: Path | str):
    if args.runner == "endpoint":
        if not args.url:
            raise SystemExit("vllm-kvcompress eval: --runner endpoint needs --url")
        from vllm_kvcompress.eval.endpoint_runner import EndpointRunner

        return EndpointRunner(args.url, args.served_model, args.xargs, args.concurrency)
    if args.runner == "offline":
        from vllm_kvcompress.eval.offline_runner import OfflineRunner

        return OfflineRunner(str(model), {"dtype": args.dtype})
    return _reference_runner(args, model)


def _reference_runner(args: argparse.Namespace, model: Path | str):
    import torch

    from vllm_kvcompress.eval.reference_runner import ReferenceRunner

    torch.set_num_threads(args.threads)
    return ReferenceRunner(model, dtype=getattr(torch, args.dtype))


def _split(values: str) -> list[str]:
    return [value.strip() for value in values.split(",") if value.strip()]
