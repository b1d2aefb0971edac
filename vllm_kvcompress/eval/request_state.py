"""Everything the reference runner knows about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_kvcompress.eval.layer_streams import LayerStreams


@dataclass
class CompressionRecord:
    """Kept token positions after one compression: kept[layer][kv_head] is an int64
    tensor of positions at full width in slot order, second_tier[layer][kv_head] those in
    the second tier. num_tokens: tokens processed when it ran."""

    num_tokens: int
    kept: list[list[torch.Tensor]]
    second_tier: list[list[torch.Tensor]]


@dataclass
class RequestState:
    """layers: one LayerStreams per attention layer. num_tokens: tokens processed (prompt
    and fed-back outputs). next_logits: [V] float32, the model's prediction of the next
    token. last_compressed_at: num_tokens at the last compression (0 = never).
    layer_densities: [1, num_layers] float32, D2O's attention density of every layer at
    the end of prefill (StreamBatch.layer_densities). scorer: the trained scorer whose
    scores the streams' acc_scores hold (None: accumulated attention)."""

    layers: list[LayerStreams]
    prompt_len: int
    num_tokens: int
    next_logits: torch.Tensor
    last_compressed_at: int = 0
    layer_densities: torch.Tensor | None = None
    compressions: list[CompressionRecord] = field(default_factory=list)
    scorer: Any = None

    def fork(self) -> RequestState:
        """An independent copy: decoding or compressing it leaves this one untouched."""
        return RequestState(
            layers=[layer.clone() for layer in self.layers], prompt_len=self.prompt_len,
            num_tokens=self.num_tokens, next_logits=self.next_logits.clone(),
            last_compressed_at=self.last_compressed_at, layer_densities=self.layer_densities,
            compressions=list(self.compressions), scorer=self.scorer,
        )

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Token positions each stream holds now at full precision: [layer][kv_head] ->
        int64 tensor."""
        return [layer.kept_positions() for layer in self.layers]

    def second_tier_positions(self) -> list[list[torch.Tensor]]:
        """Token positions in each stream's second tier: [layer][kv_head] -> int64 tensor."""
        return [layer.second_tier_positions() for layer in self.layers]
