"""Causal GQA self-attention with the records' switches, around `pgolf.kernels.attention.attention`.

Per block, on its normalized input x (B, T, dim):
  q, k, v = x Wq^T, x Wk^T, x Wv^T          (v += value embedding of the tokens, on VE layers)
  value residual: v <- a*v + b*v0            (v0 = the first block's v; the first block only records it)
  q, k <- RMSNorm per head (qk_norm); partial RoPE; q <- q * gain_h (qk_gain_init > 0)
  y = softmax(q k^T / sqrt(D), causal within each cu_seqlens segment) v, then XSA (in the kernel) if on
  y_h <- y_h * sigmoid(W x[:window])_h ('sparse') or sigmoid(W x)_h ('dense')
  out = y Wo^T
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.kernels.attention import attention
from pgolf.model.config import ModelConfig
from pgolf.model.mlp import init_matrix
from pgolf.model.norms import rms_norm
from pgolf.model.rotary import apply_rotary

DENSE_GATE_INIT_STD = 0.01
VALUE_RESIDUAL_INIT = (0.5, 0.5)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool, value_embed: bool, mixes_value_residual: bool):
        super().__init__()
        dim, kv_dim = cfg.model_dim, cfg.kv_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.xsa = xsa
        self.gate = cfg.attn_out_gate
        self.gate_window = cfg.gate_window
        self.qk_gain_init = cfg.qk_gain_init
        self.w_q = nn.Parameter(torch.empty(dim, dim))
        self.w_k = nn.Parameter(torch.empty(kv_dim, dim))
        self.w_v = nn.Parameter(torch.empty(kv_dim, dim))
        self.w_o = nn.Parameter(torch.empty(dim, dim))
        self.tap_qkv = nn.Identity()
        """Hook points for quantization calibration: the inputs of w_q/w_k/w_v and of w_o."""
        self.tap_o = nn.Identity()
        self.q_gain = nn.Parameter(torch.empty(self.num_heads)) if cfg.qk_gain_init > 0 else None
        gate_in = {"sparse": cfg.gate_window, "dense": dim}.get(self.gate)
        self.gate_w = nn.Parameter(torch.empty(self.num_heads, gate_in)) if gate_in else None
        self.vr_lambda = nn.Parameter(torch.empty(2)) if mixes_value_residual else None
        self.ve_scale = nn.Parameter(torch.empty(1)) if value_embed else None

    def reset_parameters(self, ortho: bool) -> None:
        for w in (self.w_q, self.w_k, self.w_v):
            init_matrix(w, ortho)
        nn.init.zeros_(self.w_o)
        if self.q_gain is not None:
            nn.init.constant_(self.q_gain, self.qk_gain_init)
        if self.gate_w is not None:
            if self.gate == "dense":
                nn.init.normal_(self.gate_w, std=DENSE_GATE_INIT_STD)
            else:
                nn.init.zeros_(self.gate_w)
        if self.vr_lambda is not None:
            with torch.no_grad():
                self.vr_lambda.copy_(torch.tensor(VALUE_RESIDUAL_INIT))
        if self.ve_scale is not None:
            nn.init.ones_(self.ve_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, ve: torch.Tensor | None = None,
                v0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim) -> (output (B, T, dim), this block's values before the residual mix (B, T, kv_dim))."""
        b, t, dim = x.shape
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.tap_qkv(x)
        q = F.linear(x, self.w_q.to(x.dtype)).view(b, t, h, d)
        k = F.linear(x, self.w_k.to(x.dtype)).view(b, t, hk, d)
        v = F.linear(x, self.w_v.to(x.dtype))
        if self.ve_scale is not None and ve is not None:
            v = v + self.ve_scale.to(v.dtype) * ve.to(v.dtype)
        v_own = v
        if self.vr_lambda is not None and v0 is not None:
            lam = self.vr_lambda.to(v.dtype)
            v = lam[0] * v + lam[1] * v0
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.q_gain is not None:
            q = q * self.q_gain.to(q.dtype)[:, None]
        dt = v.dtype  # the projections' dtype (bf16 under autocast, where the norms may return fp32)
        y = attention(q.to(dt).reshape(b * t, h, d), k.to(dt).reshape(b * t, hk, d), v.reshape(b * t, hk, d),
                      cu_seqlens, max_seqlen, xsa=self.xsa).view(b, t, h, d)
        if self.gate_w is not None:
            src = x[..., : self.gate_window] if self.gate == "sparse" else x
            y = y * torch.sigmoid(F.linear(src, self.gate_w.to(x.dtype)))[..., None]
        return F.linear(self.tap_o(y.reshape(b, t, dim)), self.w_o.to(y.dtype)), v_own
