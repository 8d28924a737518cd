"""Softcapped cross-entropy of the tied head: loss = CE(c*tanh(h W^T / c), targets).

h (N, dim), weight (V, dim), targets (N,) int64 with `ignore_index` entries skipped; softcap c <= 0 turns
the cap off. reduction "mean" (over non-ignored targets), "sum" or "none" (per-token NLL, 0 where ignored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import use_triton

IGNORE_INDEX = -100


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(z / cap) if cap > 0 else z


def softcap_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 30.0,
                                    reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    logits = softcap(F.linear(h, weight).float(), cap)
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)


def softcap_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 30.0,
                          reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The head + loss the model calls: Triton on CUDA, the reference elsewhere."""
    if use_triton(h):
        pass  # Triton path: filled in by the fused cross-entropy kernel
    return softcap_cross_entropy_reference(h, weight, targets, cap, reduction, ignore_index)
