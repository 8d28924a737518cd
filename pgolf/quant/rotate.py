"""Transforms of a weight's input dimension before quantization, undone when the artifact is loaded.

Both keep y = W x exact in float: W x = (W T)(T^-1 x), so the quantizer sees W' = W T and the Hessian
H' = T^T H T; the loader maps the dequantized W' back with T^-1. Nothing changes at run time.

- Hadamard: T = diag(signs) Hd / sqrt(b), Hd a Sylvester Hadamard matrix of the largest power-of-two block b
  dividing the width (block diagonal when the width is not a power of two), signs from a seeded generator.
  Spreading outliers over a block makes rows closer to Gaussian, so SDClip clips less signal.
- AWQ-style scaling: T = diag(a) with a_j = rms_j^alpha (rms_j = sqrt(H_jj), normalized to geometric mean 1):
  channels with large activations get finer steps. alpha is searched per tensor on the Hessian-weighted
  round-to-nearest error.
"""
from __future__ import annotations

import torch


def hadamard_block(n: int) -> int:
    """Largest power of two dividing n: the block of the (block-diagonal) Hadamard transform."""
    if n <= 0:
        raise ValueError(f"hadamard: width must be positive, not {n}")
    return n & -n


def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + n)
    return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform over blocks of `block` entries of the last dimension."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * block ** -0.5).reshape(shape)


def hadamard_rotate(w: torch.Tensor, seed: int) -> torch.Tensor:
    """W' = W T with T = diag(signs) Hd (Hd symmetric and orthogonal): flip signs, then transform rows."""
    n = w.shape[-1]
    signs = hadamard_signs(n, seed).to(device=w.device, dtype=w.dtype)
    return fwht(w * signs, hadamard_block(n))


def hadamard_unrotate(w: torch.Tensor, seed: int) -> torch.Tensor:
    """W = W' T^T = W' Hd diag(signs)."""
    n = w.shape[-1]
    signs = hadamard_signs(n, seed).to(device=w.device, dtype=w.dtype)
    return fwht(w, hadamard_block(n)) * signs


def hadamard_rotate_hessian(h: torch.Tensor, seed: int) -> torch.Tensor:
    """H' = T^T H T, computed as two row transforms (H symmetric)."""
    return hadamard_rotate(hadamard_rotate(h, seed).mT, seed)


def awq_scales(h_diag: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel factors a_j = rms_j^alpha with geometric mean 1, rounded to fp16 (stored that way)."""
    rms = h_diag.float().clamp_min(0).sqrt()
    positive = rms > 0
    floor = rms[positive].min() if positive.any() else torch.tensor(1.0, device=rms.device)
    logs = torch.log(torch.where(positive, rms, floor)) * alpha
    a = torch.exp(logs - logs.mean())
    return a.half().float()


def awq_apply(w: torch.Tensor, h: torch.Tensor | None, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W' = W diag(a), H' = diag(1/a) H diag(1/a)."""
    w2 = w * a[None, :]
    h2 = None if h is None else h / (a[:, None] * a[None, :])
    return w2, h2


def awq_undo(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return w / a[None, :].to(w.dtype)
