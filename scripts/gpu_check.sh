#!/usr/bin/env bash
# The CUDA path's device check, for a GPU machine that has torch, triton and pytest but
# not vLLM (the project's H200): no installs, one command, a few minutes.
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else ./gpu_check)
# Writes to OUT_DIR: device.txt; tests.txt (the kernel, cache and policy tests: Triton on
# CUDA against the torch references, the LBHNC bf16 pages among them); attention.json,
# compaction.json, decode.json and a .md of each (benchmarks/, tables as JSON). Without
# CUDA it runs the same steps at toy sizes in Triton's interpreter (how it is tested).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-gpu_check}}")
mkdir -p "$out"
python=$(command -v "${PYTHON:-python}")
[[ $python == /* ]] || python=$PWD/$python
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, remember a failure
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$out/$name" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || status=1
}

smoke=()
tests_limit=200
if ! $python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # The tests pick Triton on CPU tensors themselves; the emulation is told to.
    export TRITON_INTERPRET=1
    smoke=(--smoke)
    tests_limit=600  # Triton's interpreter
fi
$python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA: toy sizes, interpreted')" \
    > "$out/device.txt" 2>&1
cat "$out/device.txt"
step tests.txt $tests_limit $python -m pytest -q -p no:cacheprovider tests/kernels tests/cache \
    tests/policies
cd benchmarks
step attention.md 60 $python bench_attention.py "${smoke[@]}" --json "$out/attention.json"
step compaction.md 45 $python bench_compaction.py "${smoke[@]}" --json "$out/compaction.json"
VLLM_KVCOMPRESS_KERNELS=triton step decode.md 150 $python decode_emulation.py "${smoke[@]}" \
    --json "$out/decode.json"
tail -n 4 "$out/tests.txt"
exit $status
