"""Rotary position embedding (neox style, full rotary) applied or undone by position.

Keys and queries reach the cache after RoPE. A scorer trained on them would see every
vector turned by its position; undoing the rotation gives it the position-free vectors.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [S, D/2] float32, for positions [S]."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float32,
                                       device=positions.device) / head_size)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False,
           angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [S, ..., D] rotated by its position (inverse: rotated back), float32.

    positions [S] (int or float); the rotation of x[s] is by positions[s]. angles: their
    rope_angles when the caller has them.
    """
    head_size = x.shape[-1]
    cos, sin = angles if angles is not None else rope_angles(positions, head_size, theta)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (head_size // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    if inverse:
        sin = -sin
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
