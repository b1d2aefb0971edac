#!/usr/bin/env bash
# Set up the environment if needed, then serve the bundled model with `vllm serve` and
# answer one completion and one chat request. Extra arguments go to `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec "${VLLM_KVCOMPRESS_VENV:-.venv}/bin/vllm-kvcompress" demo "$@"
