"""Fused MLP: out = down(act(up(x))) with act = LeakyReLU(slope)^2 (slope 0.5) or ReLU^2 (slope 0).

Weights use nn.Linear's layout: w_up (hidden, dim), w_down (dim, hidden).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import use_triton


def leaky_relu_square(h: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """where(h > 0, h, slope*h)^2; slope 0 gives ReLU^2."""
    return torch.square(F.leaky_relu(h, negative_slope))


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    return F.linear(leaky_relu_square(F.linear(x, w_up), negative_slope), w_down)


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """The MLP the model calls: Triton on CUDA, the reference elsewhere. x: (..., dim)."""
    if use_triton(x):
        pass  # Triton path: filled in by the fused-MLP kernel
    return mlp_reference(x, w_up, w_down, negative_slope)
