"""Newton-Schulz orthogonalization for Muon: X <- aX + (bA + cA^2)X with A = X X^T, on X = G/||G||_F.

Tall matrices are transposed first so that A is the small Gram matrix. G is (m, n) or a batch (B, m, n).
"""
from __future__ import annotations

import torch

from pgolf.kernels.dispatch import use_triton

CLASSIC = ((3.4445, -4.7750, 2.0315),) * 5
POLAR_EXPRESS = (
    (8.1566, -22.4833, 15.8788),
    (4.0429, -2.8089, 0.5000),
    (3.8917, -2.7725, 0.5061),
    (3.2858, -2.3681, 0.4645),
    (2.3465, -1.7098, 0.4232),
)
SCHEDULES = {"classic": CLASSIC, "polar_express": POLAR_EXPRESS}


def coefficients(schedule: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """Per-step (a, b, c); a schedule shorter than `steps` repeats its last tuple."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown Newton-Schulz schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
    table = SCHEDULES[schedule]
    return tuple(table[min(i, len(table) - 1)] for i in range(steps))


def newton_schulz_reference(g: torch.Tensor, steps: int = 5, schedule: str = "polar_express",
                            eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients(schedule, steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def newton_schulz(g: torch.Tensor, steps: int = 5, schedule: str = "polar_express") -> torch.Tensor:
    """The orthogonalization Muon calls: Triton on CUDA, the reference elsewhere. Returns bf16."""
    if use_triton(g):
        pass  # Triton path: filled in by the Newton-Schulz kernel
    return newton_schulz_reference(g, steps, schedule)
