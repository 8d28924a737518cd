"""The block MLP: down(LeakyReLU(slope)(up x)^2) through the fused kernel (ReLU^2 at slope 0)."""
from __future__ import annotations

import math

import torch
from torch import nn

import torch.nn.functional as F

from pgolf.kernels.mlp import fused_mlp, leaky_relu_square


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, negative_slope: float):
        super().__init__()
        self.negative_slope = negative_slope
        self.w_up = nn.Parameter(torch.empty(hidden, dim))
        self.w_down = nn.Parameter(torch.empty(dim, hidden))
        self.tap_up = nn.Identity()
        """Hook points for quantization calibration: the inputs of w_up and of w_down."""
        self.tap_down = nn.Identity()

    def reset_parameters(self, ortho: bool) -> None:
        """up: orthogonal (or nn.Linear's default); down: zero, so each block starts as the identity."""
        init_matrix(self.w_up, ortho)
        nn.init.zeros_(self.w_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tap_up(x)
        w_up, w_down = self.w_up.to(x.dtype), self.w_down.to(x.dtype)
        if self.tap_down._forward_pre_hooks:  # calibrating: the fused kernel never shows the hidden activation
            return F.linear(self.tap_down(leaky_relu_square(F.linear(x, w_up), self.negative_slope)), w_down)
        return fused_mlp(x, w_up, w_down, self.negative_slope)


def init_matrix(w: torch.Tensor, ortho: bool) -> None:
    """Orthogonal with gain 1 (the records), or nn.Linear's kaiming-uniform default (the naive baseline)."""
    if ortho:
        nn.init.orthogonal_(w, gain=1.0)
    else:
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
