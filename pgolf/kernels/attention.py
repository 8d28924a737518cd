"""Causal GQA attention over packed documents, with XSA (exclusive self attention) optional.

q (T, Hq, D), k and v (T, Hkv, D) hold all tokens of a batch packed end to end; `cu_seqlens` (int32, N+1)
marks document starts (a batch of fixed-length rows is the special case of equal lengths). Query head h reads
KV head h // (Hq // Hkv). Scale 1/sqrt(D); QK gain and Q/K norms are applied by the caller.
XSA: y_t = o_t - (o_t . v̂_t) v̂_t, v̂_t = v_t / max(||v_t||, eps), v_t the token's own value of that KV head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import use_triton

XSA_EPS = 1e-6


def xsa_reference(o: torch.Tensor, v: torch.Tensor, eps: float = XSA_EPS) -> torch.Tensor:
    """o (T, Hq, D), v (T, Hkv, D): remove from each head output its component along the token's own value."""
    group = o.shape[1] // v.shape[1]
    v_hat = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    v_hat = v_hat.repeat_interleave(group, dim=1)
    return o - (o * v_hat).sum(-1, keepdim=True) * v_hat


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        max_seqlen: int, xsa: bool = True) -> torch.Tensor:
    """Document by document: SDPA with a causal mask, GQA by repeating KV heads, then XSA."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        out[start:end] = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1)
    return xsa_reference(out, v) if xsa else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              xsa: bool = True) -> torch.Tensor:
    """The attention the model calls: the fastest correct path on CUDA, the reference elsewhere."""
    if use_triton(q):
        pass  # Triton path: filled in by the attention kernel
    return attention_reference(q, k, v, cu_seqlens, max_seqlen, xsa)
