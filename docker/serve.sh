#!/usr/bin/env bash
# The images' entry point: `vllm serve` on port 8000 of every interface, with the bundled
# model unless MODEL names another, and the image's SERVE_DEFAULTS (the CPU image:
# --enforce-eager, compiling costs ~50 s per start); arguments go to `vllm serve`.
set -euo pipefail
model=${MODEL:-$(vllm-kvcompress model smollm2-135m)}
# shellcheck disable=SC2086  # SERVE_DEFAULTS holds several flags
exec vllm serve "$model" --host 0.0.0.0 --port 8000 ${SERVE_DEFAULTS:-} "$@"
