"""The running contexts of stateful trained scorers (the attention gate) between engine
steps: per scorer, one row per request slot, layer and KV head."""

from __future__ import annotations

import torch

from vllm_kvcompress.scorers.trained_scorer import TrainedScorer


class ScorerStates:
    """Per stateful scorer a tensor [max_requests, L, H, state_size], made on first use."""

    def __init__(self, max_requests: int, num_layers: int, num_kv_heads: int, device):
        self.shape = (max_requests, num_layers, num_kv_heads)
        self.device = device
        self._states: dict[TrainedScorer, torch.Tensor] = {}

    def clear(self, scorer: TrainedScorer, slot: int) -> None:
        """Empty the context of the request in `slot` (it starts from its first token)."""
        if scorer.state_size:
            self._of(scorer)[slot] = 0

    def read(self, scorer: TrainedScorer, slots: torch.Tensor, layer: int) -> torch.Tensor | None:
        """[R, H, state_size] copy of the contexts of `slots` [R] at `layer` (None: stateless)."""
        return self._of(scorer)[slots, layer] if scorer.state_size else None

    def write(self, scorer: TrainedScorer, slots: torch.Tensor, layer: int,
              state: torch.Tensor | None) -> None:
        if state is not None:
            self._of(scorer)[slots, layer] = state

    def _of(self, scorer: TrainedScorer) -> torch.Tensor:
        if scorer not in self._states:
            self._states[scorer] = torch.zeros(*self.shape, scorer.state_size, device=self.device)
        return self._states[scorer]
