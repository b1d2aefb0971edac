#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CPU only).
#   scripts/test.sh            the default suite (CI runs exactly this)
#   scripts/test.sh --slow     the slow suites only (long end-to-end runs)
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
marker="not slow"
if [ "${1:-}" = "--slow" ]; then
    marker="slow"
    shift
fi
exec "${VLLM_KVCOMPRESS_VENV:-.venv}/bin/python" -m pytest -m "$marker" "$@"
