"""Locret's retaining heads: per layer and KV head, an MLP that predicts how much attention
later queries will pay a token, from the token's own q, k, v.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads" (2024). The paper's head reads the layer's whole [q, k, v]; ours reads,
per KV head, the q of the G query heads of its group plus its k and v (G*D + 2D inputs),
so that under tensor parallelism each rank scores its own KV heads without gathering.
Keys and queries arrive after RoPE and are rotated back first (scorers/rope.py), so a
token scores the same at any position. Inputs are scaled by per-feature constants fixed
from the first training batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_kvcompress.scorers.rope import rope_angles, rotate

# Resolution of a written score (in log-attention units: 1 = a factor of e).
SCORE_STEP = 1 / 64


@dataclass(frozen=True)
class ModelShape:
    """What a set of weights was trained for; `fingerprint` must match at load."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    rope_theta: float

    @classmethod
    def of_config(cls, config) -> ModelShape:
        """From a transformers config (vLLM's hf_config is one)."""
        # transformers 5 keeps theta and the RoPE type in one dict (either name).
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"trained scorers support plain RoPE only; the model has {rope}")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(model_type=config.model_type, num_layers=config.num_hidden_layers,
                   num_heads=heads, num_kv_heads=config.num_key_value_heads,
                   head_size=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   hidden_size=config.hidden_size, vocab_size=config.vocab_size,
                   rope_theta=float(theta))

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class RetainingHeads(nn.Module):
    """One MLP per (layer, KV head): [q_1..q_G, k, v] (I = G*D + 2D) -> hidden -> 1 score.

    Parameters: w1 [L, H, I, hidden], b1 [L, H, hidden], w2 [L, H, hidden], b2 [L, H];
    buffer in_scale [L, H, I] multiplies the inputs.
    """

    def __init__(self, shape: ModelShape, hidden: int = 64):
        super().__init__()
        self.shape, self.hidden = shape, hidden
        self.source = "untrained"  # the weights file, once loaded
        self._scaled_w1: torch.Tensor | None = None
        self._angle_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        layers, heads = shape.num_layers, shape.num_kv_heads
        inputs = (shape.group + 2) * shape.head_size
        self.w1 = nn.Parameter(torch.randn(layers, heads, inputs, hidden) * inputs ** -0.5)
        self.b1 = nn.Parameter(torch.zeros(layers, heads, hidden))
        self.w2 = nn.Parameter(torch.randn(layers, heads, hidden) * hidden ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(layers, heads))
        self.register_buffer("in_scale", torch.ones(layers, heads, inputs))

    def features(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """[S, H, I] float32 inputs from queries [S, H, G, D], keys/values [S, H, D] (after
        RoPE, at token positions [S])."""
        rotated = torch.cat([queries, keys[:, :, None]], dim=2)                    # [S, H, G+1, D]
        rotated = rotate(rotated, positions, self.shape.rope_theta, inverse=True,
                         angles=self._angles(positions))
        return torch.cat([rotated.flatten(2), values.float()], dim=-1)

    def forward(self, layer: int, features: torch.Tensor, first_head: int = 0) -> torch.Tensor:
        """[S, H'] scores of KV heads first_head .. first_head + H' - 1 for features [S, H', I]."""
        heads = slice(first_head, first_head + features.shape[1])
        x = features * self.in_scale[layer, heads]
        hidden = torch.einsum("shi,hio->sho", x, self.w1[layer, heads]) + self.b1[layer, heads]
        hidden = nn.functional.silu(hidden)
        return (hidden * self.w2[layer, heads]).sum(-1) + self.b2[layer, heads]

    @torch.no_grad()
    def score(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor, first_head: int = 0) -> torch.Tensor:
        """[S, H'] float32 predicted importance (higher = keep) of S new tokens, by frozen
        heads (`forward` in two batched matmuls, in_scale folded into w1).

        queries [S, H', G, D], keys/values [S, H', D] after RoPE; positions [S];
        first_head: the first KV head these are (tensor parallelism). Rounded to
        SCORE_STEP: repeated tokens, whose inputs differ only by RoPE rounding, then tie
        exactly and go to the earlier slot on every path (vLLM's and the reference's)."""
        if self._scaled_w1 is None:
            self._scaled_w1 = (self.w1 * self.in_scale[..., None]).detach()
        heads = slice(first_head, first_head + keys.shape[1])
        x = self.features(queries, keys, values, positions).transpose(0, 1)        # [H', S, I]
        hidden = torch.baddbmm(self.b1[layer, heads, None], x, self._scaled_w1[layer, heads])
        scores = torch.bmm(nn.functional.silu(hidden, inplace=True), self.w2[layer, heads, :, None])
        scores = scores[..., 0].T + self.b2[layer, heads]
        return torch.round(scores / SCORE_STEP) * SCORE_STEP

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) of positions [S], reused while the positions repeat (every layer
        of a step scores the same tokens)."""
        cached = self._angle_cache
        if cached is None or cached[0].shape != positions.shape or not torch.equal(cached[0], positions):
            cached = (positions.clone(), *rope_angles(positions, self.shape.head_size,
                                                      self.shape.rope_theta))
            self._angle_cache = cached
        return cached[1], cached[2]

    def save(self, path: Path, card: dict) -> None:
        """The weights as safetensors, the card as JSON next to them (same stem)."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"shape": json.dumps(asdict(self.shape)), "hidden": str(self.hidden),
                "fingerprint": self.shape.fingerprint}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata=meta)
        path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> RetainingHeads:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        heads = cls(ModelShape(**json.loads(meta["shape"])), hidden=int(meta["hidden"]))
        heads.load_state_dict(load_file(str(path)))
        heads.source = str(path)
        return heads.eval()
