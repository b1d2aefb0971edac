"""A frozen model's forward that records, per layer, what the retaining heads learn from.

Registered with transformers' AttentionInterface under CAPTURE_NAME; the model attends as
usual (causal SDPA) and, for an Example, each layer records for the tokens before its
region: the heads' input features and the label, the largest attention any query of the
region (from any head of the KV head's group) pays the token. For held-out scoring it
also records the SnapKV window score of the prompt's last queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from vllm_kvcompress.scorers.retaining_heads import RetainingHeads

CAPTURE_NAME = "kvcompress_capture"
# SnapKV's observation window and pooling kernel (its published defaults).
SNAPKV_WINDOW, SNAPKV_KERNEL = 32, 7


@dataclass
class Capture:
    """What one forward records, per layer: features [r, H, I], labels [r, H] float32,
    snapkv [r, H] (only with snapkv_end), key_norms [r, H]; r = region_start."""

    heads: RetainingHeads
    region_start: int
    snapkv_end: int | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    snapkv: dict[int, torch.Tensor] = field(default_factory=dict)
    key_norms: dict[int, torch.Tensor] = field(default_factory=dict)


def _probs(queries: torch.Tensor, keys: torch.Tensor, first_query: int, scale: float) -> torch.Tensor:
    """[H, G, Q, S] causal softmax of queries [H, G, Q, D] (positions first_query..) over
    keys [H, S, D] (positions 0..)."""
    logits = torch.einsum("hgqd,hsd->hgqs", queries.float(), keys.float()) * scale
    q_pos = torch.arange(first_query, first_query + queries.shape[2])
    visible = torch.arange(keys.shape[1])[None, :] <= q_pos[:, None]
    return torch.softmax(logits.masked_fill(~visible, -torch.inf), dim=-1)


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
    with torch.no_grad():
        labels = _probs(queries[:, :, r:], key[0], r, scaling).amax(dim=(1, 2))[:, :r]
        capture.labels[module.layer_idx] = labels.T.contiguous()
        capture.features[module.layer_idx] = capture.heads.features(
            queries[:, :, :r].permute(2, 0, 1, 3), key[0, :, :r].transpose(0, 1),
            value[0, :, :r].transpose(0, 1), position_ids[0, :r])
        capture.key_norms[module.layer_idx] = key[0, :, :r].float().norm(dim=-1).T
        if capture.snapkv_end is not None:
            start = capture.snapkv_end - SNAPKV_WINDOW
            window = _probs(queries[:, :, start:capture.snapkv_end], key[0], start, scaling)
            scores = window.sum(dim=2).mean(dim=1)[:, :r]                                 # [H, r]
            pooled = F.max_pool1d(scores[:, None], SNAPKV_KERNEL, 1, SNAPKV_KERNEL // 2)[:, 0]
            capture.snapkv[module.layer_idx] = pooled.T.contiguous()
    return output.transpose(1, 2), None


AttentionInterface.register(CAPTURE_NAME, capture_attention)
