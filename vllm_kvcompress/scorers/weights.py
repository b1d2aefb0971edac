"""Where trained scorer weights live, and loading them once per process for a model."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from vllm_kvcompress.scorers.retaining_heads import ModelShape, RetainingHeads

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "policies" / "weights"


def weights_path(scorer: str, model: str) -> Path:
    return WEIGHTS_DIR / f"{scorer}-{model}.safetensors"


@cache
def load_heads(path: str) -> RetainingHeads:
    """The heads in `path`, loaded once per process. ValueError (a settings error) names the
    training command when the file is missing."""
    if not Path(path).is_file():
        raise ValueError(
            f"no trained weights at {path}; train them with `vllm-kvcompress train locret` "
            f"(or pass kv_policy_args weights: PATH)")
    try:
        return RetainingHeads.load(Path(path))
    except Exception as error:  # safetensors' own errors are not ValueErrors
        raise ValueError(f"{path}: not a trained scorer's weights file ({error})") from None


def check_model(heads: RetainingHeads, config) -> None:
    """ValueError unless the model `config` (a transformers config) is the one the heads
    were trained for."""
    try:
        shape = ModelShape.of_config(config)
    except ValueError as error:
        raise ValueError(f"{heads.source}: {error}") from None
    if shape.fingerprint != heads.shape.fingerprint:
        raise ValueError(
            f"{heads.source} was trained for another model (fingerprint {heads.shape.fingerprint}: "
            f"{heads.shape}); this model is {shape.fingerprint}: {shape}. Train weights for "
            f"it with `vllm-kvcompress train locret --model NAME` and pass them as "
            f"kv_policy_args weights: PATH")
