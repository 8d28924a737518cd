"""LQER: a low-rank correction of a tensor's quantization error, stored in low bits and added back at load.

E = W - W_hat ~ A B with A (rows x r), B (r x cols) from the rank-r SVD (A = U sqrt(S), B = sqrt(S) V^T).
A is quantized first (int2, symmetric, one fp16 scale per group of 64 entries of each column); B is then
refit to the quantized A by least squares (B = argmin ||E - A_hat B||, so B absorbs A's rounding) and quantized
to int4 in groups of 64 entries of each row; A is refit to B_hat and the alternation repeats, keeping the best
pair. The correction is A_hat @ B_hat.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.quant.bits import qmax as qmax_of
from pgolf.quant.clip import round_scale


@dataclass
class LQERFactors:
    a_q: torch.Tensor      # int8 (rows, r)
    a_scale: torch.Tensor  # fp16 (r, ceil(rows / group))
    b_q: torch.Tensor      # int8 (r, cols)
    b_scale: torch.Tensor  # fp16 (r, ceil(cols / group))
    a_bits: int
    b_bits: int
    group: int

    @property
    def rank(self) -> int:
        return self.b_q.shape[0]


def quantize_groups(x: torch.Tensor, bits: int, group: int, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of each row of x in groups of `group` entries: (int8 codes, fp16 scales).

    Each group's scale is the clip ratio of its max |x| (over a grid) with the least squared error: at 2 bits
    (codes -1, 0, 1) the max-based scale would round most entries to zero.
    """
    rows, cols = x.shape
    ngroups = -(-cols // group)
    pad = ngroups * group - cols
    xp = torch.nn.functional.pad(x.float(), (0, pad)).reshape(rows, ngroups, group)
    qm = qmax_of(bits)
    amax = xp.abs().amax(dim=2)
    best_s, best_err = None, None
    for r in torch.linspace(1.0 / steps, 1.0, steps).tolist():
        s = round_scale(amax * r / qm)
        q = torch.clamp(torch.floor(xp / s[..., None] + 0.5), -qm, qm)
        err = ((q * s[..., None] - xp) ** 2).sum(dim=2)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    q = torch.clamp(torch.floor(xp / best_s[..., None] + 0.5), -qm, qm)
    return q.reshape(rows, -1)[:, :cols].to(torch.int8), best_s.half()


def dequantize_groups(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = q.shape
    scale = s.float().repeat_interleave(group, dim=1)[:, :cols]
    return q.float() * scale


def lqer_factors(err: torch.Tensor, rank: int, group: int = 64, a_bits: int = 2, b_bits: int = 4,
                 rounds: int = 3) -> LQERFactors:
    """Quantized rank-`rank` factors of the error matrix `err` (rows x cols); the best of `rounds` alternations."""
    e = err.float()
    rank = max(1, min(rank, *e.shape))
    u, sv, vh = torch.linalg.svd(e, full_matrices=False)
    root = sv[:rank].sqrt()
    a = u[:, :rank] * root[None, :]
    best = None
    for _ in range(rounds):
        a_q, a_s = quantize_groups(a.T.contiguous(), a_bits, group)
        a_hat = dequantize_groups(a_q, a_s, group).T
        b_q, b_s = quantize_groups(_lstsq(a_hat, e), b_bits, group)
        b_hat = dequantize_groups(b_q, b_s, group)
        left = float(((e - a_hat @ b_hat) ** 2).sum())
        if best is None or left < best[0]:
            best = (left, a_q, a_s, b_q, b_s)
        a = _lstsq(b_hat.T, e.T).T  # refit A to the quantized B, then quantize again
    _, a_q, a_s, b_q, b_s = best
    return LQERFactors(a_q.T.contiguous(), a_s, b_q, b_s, a_bits, b_bits, group)


def _lstsq(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """argmin_B ||E - A B|| with a tiny ridge (A may be rank-deficient after 2-bit rounding)."""
    gram = a.T @ a
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(gram.shape[0], device=a.device)
    return torch.linalg.solve(gram + ridge, a.T @ e)


def lqer_correction(f: LQERFactors) -> torch.Tensor:
    """A_hat @ B_hat (rows x cols), fp32."""
    a_hat = dequantize_groups(f.a_q.T.contiguous(), f.a_scale, f.group).T
    b_hat = dequantize_groups(f.b_q, f.b_scale, f.group)
    return a_hat @ b_hat
