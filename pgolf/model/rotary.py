"""Partial rotary position embedding with the records' context extension.

Only the first `rope_dims` dims of each head rotate (the rest pass through). Within them the pairs are
(i, i + r/2) ("half split"): out = [x1 cos + x2 sin, x2 cos - x1 sin], angle_i(t) = t * base^(-2i/r).
Context extension ("YaRN" in the records, NTK-aware base scaling): for a factor s > 1 the base becomes
base * s^(r/(r-2)), which leaves the fastest frequency alone and stretches the slow ones by about s.
"""
from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, rope_dims: int, base: float, train_seq_len: int, yarn_scale: float = 1.0):
        super().__init__()
        self.rope_dims = rope_dims or head_dim
        self.base = base
        self.train_seq_len = train_seq_len
        self.yarn_scale = yarn_scale

    def scale_for(self, seq_len: int) -> float:
        """The context-extension factor used at this length (1 = none)."""
        if self.yarn_scale == 0:
            return max(1.0, seq_len / self.train_seq_len)
        return self.yarn_scale

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (seq_len, 1, rope_dims/2) tables, broadcast over heads. Recomputed per call (cheap, no cache
        to go stale under torch.compile or a device move)."""
        r = self.rope_dims
        base = self.base
        s = self.scale_for(seq_len)
        if s > 1:
            base = base * s ** (r / (r - 2))
        inv_freq = base ** (-torch.arange(0, r, 2, dtype=torch.float32, device=device) / r)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, D); cos/sin (T, 1, r/2) with r <= D. Rotates x[..., :r], passes x[..., r:] through."""
    half = cos.size(-1)
    r = 2 * half
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)
