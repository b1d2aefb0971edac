"""What every trained scorer shares: the model it was trained for (ModelShape), its input
features (a token's q of the group's query heads, k and v, RoPE undone), batched scoring
rounded to SCORE_STEP, and its weights file.

A scorer answers `score(layer, queries, keys, values, positions, segments=...)` with one
score per new token and KV head (higher = keep). Scorers are registered by `kind`, which
names their weights file and their `vllm-kvcompress train` command.
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

SCORERS: dict[str, type[TrainedScorer]] = {}


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
    def inputs(self) -> int:
        """Features per token and KV head: G queries, the key and the value."""
        return (self.group + 2) * self.head_size

    @property
    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def register_scorer(cls: type[TrainedScorer]) -> type[TrainedScorer]:
    SCORERS[cls.kind] = cls
    return cls


class TrainedScorer(nn.Module):
    """Base: subclasses define `kind`, their parameters and `forward`.

    forward(layer, features [S, H', I], first_head, segments, state) -> [S, H'] float32
    scores; buffer in_scale [L, H, I] multiplies the features (fixed from the first
    training batch). A scorer that reads a token's context keeps `state_size` numbers per
    request, layer and KV head between steps (0: none).
    """

    kind = ""
    state_size = 0

    def __init__(self, shape: ModelShape, hidden: int):
        super().__init__()
        self.shape, self.hidden = shape, hidden
        self.source = "untrained"  # the weights file, once loaded
        self._angle_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("in_scale", torch.ones(shape.num_layers, shape.num_kv_heads,
                                                    shape.inputs))

    def features(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """[S, H, I] float32 inputs from queries [S, H, G, D], keys/values [S, H, D] (after
        RoPE, at token positions [S])."""
        rotated = torch.cat([queries, keys[:, :, None]], dim=2)                    # [S, H, G+1, D]
        rotated = rotate(rotated, positions, self.shape.rope_theta, inverse=True,
                         angles=self._angles(positions))
        return torch.cat([rotated.flatten(2), values.float()], dim=-1)

    def new_state(self, requests: int, heads: int, device=None) -> torch.Tensor | None:
        """[requests, heads, state_size] empty contexts for one layer (None: stateless)."""
        if not self.state_size:
            return None
        return torch.zeros(requests, heads, self.state_size, device=device)

    @torch.no_grad()
    def score(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor, first_head: int = 0, segments: torch.Tensor | None = None,
              state: torch.Tensor | None = None) -> torch.Tensor:
        """[S, H'] float32 predicted importance (higher = keep) of S new tokens.

        queries [S, H', G, D], keys/values [S, H', D] after RoPE; positions [S];
        first_head: the first KV head these are (tensor parallelism); segments [R + 1]:
        where each request's rows start (None: one request); state [R, H', state_size]:
        the requests' contexts from earlier steps, advanced in place (stateful scorers).
        Rounded to SCORE_STEP: repeated tokens, whose inputs differ only by RoPE rounding,
        then tie exactly and go to the earlier slot on every path (vLLM's and the
        reference's)."""
        features = self.features(queries, keys, values, positions)
        scores = self(layer, features, first_head, segments, state)
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
        meta = {"kind": self.kind, "shape": json.dumps(asdict(self.shape)),
                "hidden": str(self.hidden), "fingerprint": self.shape.fingerprint}
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata=meta)
        path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")

    @staticmethod
    def load(path: Path) -> TrainedScorer:
        """The scorer saved in `path`, of the kind its metadata names."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        cls = SCORERS[meta["kind"]]
        scorer = cls(ModelShape(**json.loads(meta["shape"])), hidden=int(meta["hidden"]))
        scorer.load_state_dict(load_file(str(path)))
        scorer.source = str(path)
        return scorer.eval()
