"""Base of the policies that keep what a trained scorer (scorers/) predicts is needed.

The scorer scores each token from its own q, k, v (and, for the gate, its context) when its
K/V are written (`write_scorer`), so no attention probabilities are needed and attention
stays on vLLM's kernel; the policy keeps the top-scored slots plus sinks and the window.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from vllm_kvcompress.bundled_models import DEFAULT_MODEL
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.options import file_path
from vllm_kvcompress.policies.stream_batch import StreamBatch
from vllm_kvcompress.scorers.weights import load_scorer, weights_path


class TrainedScorerPolicy(Policy):
    """Signals: the written scores (acc_scores). Option `weights`: the scorer's file
    (default: the bundled model's, policies/weights/<scorer_kind>-smollm2-135m.safetensors),
    which must belong to the served model (checked at start-up and per request)."""

    scorer_kind: ClassVar[str] = ""
    options_spec = {"weights": file_path(None)}

    def __init__(self, window: int | None = None, sinks: int | None = None, **options):
        super().__init__(window, sinks, **options)
        self.weights_file = self.options["weights"] or str(weights_path(self.scorer_kind, DEFAULT_MODEL))
        self.write_scorer = load_scorer(self.weights_file, self.scorer_kind)

    def score(self, batch: StreamBatch) -> torch.Tensor:
        return batch.acc_scores.float()
