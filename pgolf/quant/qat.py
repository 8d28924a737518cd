"""Quantization-aware training: fake-quantize weights in the forward pass, straight-through in the backward.

`qat_weight(w, bits, clip_k)` rounds w exactly as the export does with SDClip scales (s = k std(row) / qmax,
rounded to fp16, codes floor(w / s + 1/2) clamped to [-qmax, qmax]) and passes the gradient straight through
(identity), optionally zeroing it for clipped entries. The trainer switches it on early or late
(QuantConfig.qat, qat_start_frac) and gets each weight's bits and k from `qat_plan`, the same classification the
export uses, so the network trains against the grid it will be stored on. GPTQ at export still moves codes
relative to this round-to-nearest grid; QAT only makes the weights sit close to it.
"""
from __future__ import annotations

import torch
from torch import nn

from pgolf.quant.bits import qmax as qmax_of
from pgolf.quant.clip import round_scale
from pgolf.quant.config import QuantConfig


def _scales(w32: torch.Tensor, bits: int, clip_k: float | None) -> torch.Tensor:
    qm = qmax_of(bits)
    if clip_k is None:
        return round_scale(w32.abs().amax(dim=-1) / qm)
    return round_scale(clip_k * w32.std(dim=-1, correction=0) / qm)


def fake_quantize(w: torch.Tensor, bits: int, clip_k: float | None = None) -> torch.Tensor:
    """Dequantized round-to-nearest of w (fp32) with SDClip scales (absmax when clip_k is None); no gradient."""
    w32 = w.detach().float()
    qm = qmax_of(bits)
    s = _scales(w32, bits, clip_k)[..., None]
    return torch.clamp(torch.floor(w32 / s + 0.5), -qm, qm) * s


def qat_weight(w: torch.Tensor, bits: int, clip_k: float | None = None, clipped_grad: bool = False) -> torch.Tensor:
    """Forward value Q(w) in w's dtype; gradient 1 (or 0 on entries the clip cuts, with `clipped_grad`)."""
    q = fake_quantize(w, bits, clip_k).to(w.dtype)
    if not clipped_grad:
        return w + (q - w).detach()
    w32 = w.detach().float()
    limit = (qmax_of(bits) + 0.5) * _scales(w32, bits, clip_k)[..., None]
    inside = (w32.abs() < limit).to(w.dtype)
    return q + (w - w.detach()) * inside


def qat_plan(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[int, float]]:
    """Parameter name -> (bits, SDClip k) for every weight the export will quantize."""
    plan = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and p.numel() >= cfg.quant_min_numel:
            plan[name] = (cfg.bits_for(name), cfg.clip_sigmas_for(name))
    return plan


def qat_active(cfg: QuantConfig, progress: float) -> bool:
    """Whether QAT is on at `progress` (fraction of the training budget spent)."""
    return cfg.qat and progress >= cfg.qat_start_frac


class QATForward(nn.Module):
    """`model`'s forward with the planned weights fake-quantized (straight-through into the real parameters):
    what the trainer runs once QAT is on. Works on any model, whatever way it uses its weights."""

    def __init__(self, model: nn.Module, plan: dict[str, tuple[int, float]]):
        super().__init__()
        self.model = model
        self.plan = plan

    def forward(self, *args, **kwargs):
        params = dict(self.model.named_parameters())
        swapped = {name: qat_weight(params[name], bits, k) for name, (bits, k) in self.plan.items()}
        return torch.func.functional_call(self.model, swapped, args, kwargs)
