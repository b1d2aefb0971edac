"""Where trained scorer weights live, and loading them once per process for a model."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import vllm_kvcompress.scorers  # noqa: F401  (registers the scorer kinds)
from vllm_kvcompress.scorers.trained_scorer import ModelShape, TrainedScorer

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "policies" / "weights"


def weights_path(kind: str, model: str) -> Path:
    return WEIGHTS_DIR / f"{kind}-{model}.safetensors"


@cache
def load_scorer(path: str, kind: str) -> TrainedScorer:
    """The `kind` scorer in `path`, loaded once per process. ValueError (a settings error)
    names the training command when the file is missing or holds another kind."""
    if not Path(path).is_file():
        raise ValueError(
            f"no trained weights at {path}; train them with `vllm-kvcompress train {kind}` "
            f"(or pass kv_policy_args weights: PATH)")
    try:
        scorer = TrainedScorer.load(Path(path))
    except Exception as error:  # safetensors' own errors are not ValueErrors
        raise ValueError(f"{path}: not a trained scorer's weights file ({error})") from None
    if scorer.kind != kind:
        raise ValueError(f"{path} holds {scorer.kind} weights, not {kind}; train them with "
                         f"`vllm-kvcompress train {kind}`")
    return scorer


def check_model(scorer: TrainedScorer, config) -> None:
    """ValueError unless the model `config` (a transformers config) is the one the scorer
    was trained for."""
    try:
        shape = ModelShape.of_config(config)
    except ValueError as error:
        raise ValueError(f"{scorer.source}: {error}") from None
    if shape.fingerprint != scorer.shape.fingerprint:
        raise ValueError(
            f"{scorer.source} was trained for another model (fingerprint {scorer.shape.fingerprint}: "
            f"{scorer.shape}); this model is {shape.fingerprint}: {shape}. Train weights for "
            f"it with `vllm-kvcompress train {scorer.kind} --model NAME` and pass them as "
            f"kv_policy_args weights: PATH")
