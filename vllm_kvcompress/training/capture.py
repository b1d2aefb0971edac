"""A frozen model's forward that records, per layer, what a trained scorer learns from.

Registered with transformers' AttentionInterface under CAPTURE_NAME; the model attends as
usual (causal SDPA) and, for an Example, each layer records for the tokens before its
region: the heads' input features and the label, the largest attention any query of the
region (from any head of the KV head's group) pays the token. For held-out scoring it
also records the snapkv policy's score of the prompt (its last queries as the window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from vllm_kvcompress.policies import StreamBatch, make_policy
from vllm_kvcompress.policies.scoring import attention_probs
from vllm_kvcompress.scorers.trained_scorer import TrainedScorer

CAPTURE_NAME = "kvcompress_capture"
# The baseline the held-out recall compares with, at its published defaults.
SNAPKV = make_policy("snapkv")


@dataclass
class Capture:
    """What one forward records, per layer: features [r, H, I] (only with heads), labels
    [r, H] float32, snapkv [r, H] (only with snapkv_end), key_norms [r, H]; r = region_start."""

    heads: TrainedScorer | None
    region_start: int
    num_layers: int
    snapkv_end: int | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    snapkv: dict[int, torch.Tensor] = field(default_factory=dict)
    key_norms: dict[int, torch.Tensor] = field(default_factory=dict)


def capture_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                      dropout: float = 0.0, *, capture: Capture, position_ids: torch.Tensor,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """query [1, Hq, S, D], key/value [1, H, S, D] -> ([1, S, Hq, D], None)."""
    _, query_heads, length, head_size = query.shape
    heads = key.shape[1]
    group = query_heads // heads
    output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                            enable_gqa=True)
    r = capture.region_start
    queries = query[0].view(heads, group, length, head_size)
    keys, positions = key[0], position_ids[0].expand(heads, -1)
    lengths = torch.full((heads,), length)
    with torch.no_grad():
        probs = attention_probs(queries[:, :, r:], keys, lengths, positions,
                                positions[:, r:], scaling)
        capture.labels[module.layer_idx] = probs.amax(dim=(1, 2))[:, :r].T.contiguous()
        if capture.heads is not None:
            capture.features[module.layer_idx] = capture.heads.features(
                queries[:, :, :r].permute(2, 0, 1, 3), keys[:, :r].transpose(0, 1),
                value[0, :, :r].transpose(0, 1), position_ids[0, :r])
        capture.key_norms[module.layer_idx] = keys[:, :r].float().norm(dim=-1).T
        if capture.snapkv_end is not None:
            capture.snapkv[module.layer_idx] = _snapkv_scores(
                capture, module.layer_idx, queries, key[0], value[0], scaling)[:, :r].T
    return output.transpose(1, 2), None


def _snapkv_scores(capture: Capture, layer: int, queries: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, prompt] the snapkv policy's own scores of the prompt (up to snapkv_end), with
    its last SNAPKV.window queries as the window."""
    end, heads = capture.snapkv_end, keys.shape[0]
    positions = torch.arange(end).expand(heads, -1)
    batch = StreamBatch(
        keys=keys[:, :end], values=values[:, :end], lengths=torch.full((heads,), end),
        positions=positions, acc_scores=torch.zeros(heads, end), num_kv_heads=heads,
        layer=layer, num_layers=capture.num_layers, scale=scale,
        window_queries=queries[:, :, end - SNAPKV.window:end],
        window_positions=positions[:, end - SNAPKV.window:])
    return SNAPKV.score(batch)


AttentionInterface.register(CAPTURE_NAME, capture_attention)
