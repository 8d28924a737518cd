"""Full-Hessian GPTQ of a model's matrices, around the blocked sweep in pgolf.kernels.gptq.

Per matrix W (rows x cols) with input Hessian H:
1. optional transforms of the input dimension (AWQ scaling, Hadamard rotation; rotate.py), H transformed along;
2. bits (fixed per class or a mixed allocation) and per-row scales chosen before the sweep (clip.py);
3. H: dead columns (H_jj = 0) get H_jj = 1 and W_:,j = 0; damping += damp * mean(diag H); act-order sorts
   columns by decreasing diag H; U = upper Cholesky factor of H^-1 (all in fp64, batched per width, once per
   distinct Hessian: q/k/v reading the same input share it);
4. the sweep for all matrices of one width in one kernel launch; codes are mapped back with the inverse
   permutation;
5. LQER on the `lqer_top_k` tensors with the largest Hessian-weighted error tr(E H E^T).

A tensor without a Hessian is rounded to nearest (GPTQ with H = I is exactly that).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pgolf.kernels.gptq import gptq_quantize
from pgolf.quant import clip as clip_mod
from pgolf.quant.bits import qmax as qmax_of
from pgolf.quant.config import QuantConfig
from pgolf.quant.lqer import LQERFactors, lqer_correction, lqer_factors
from pgolf.quant.rotate import (awq_apply, awq_scales, awq_undo, hadamard_rotate, hadamard_rotate_hessian,
                                hadamard_unrotate)


@dataclass
class QTensor:
    """A quantized matrix: codes and fp16 row scales in the transformed domain, plus what undoes the transforms."""
    q: torch.Tensor                       # int8 (rows, cols), original column order
    scale: torch.Tensor                   # fp16 (rows,)
    bits: int
    dtype: str = "float32"                # dtype of the original weight (torch.<name>)
    awq: torch.Tensor | None = None       # fp16 (cols,) input-channel factors
    hadamard_seed: int | None = None
    lqer: LQERFactors | None = None
    info: dict = field(default_factory=dict)  # not serialized: k, errors, ...

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def dequantize(qt: QTensor, device: torch.device | str | None = None) -> torch.Tensor:
    """W = untransform(q * s) + A_hat B_hat, fp32. The one dequantizer (export report and artifact loader)."""
    device = device if device is not None else qt.q.device
    w = qt.q.to(device).float() * qt.scale.to(device).float()[:, None]
    if qt.hadamard_seed is not None:
        w = hadamard_unrotate(w, qt.hadamard_seed)
    if qt.awq is not None:
        w = awq_undo(w, qt.awq.to(device).float())
    if qt.lqer is not None:
        f = qt.lqer
        moved = LQERFactors(f.a_q.to(device), f.a_scale.to(device), f.b_q.to(device), f.b_scale.to(device),
                            f.a_bits, f.b_bits, f.group)
        w = w + lqer_correction(moved)
    return w


def select_weights(state_dict: dict[str, torch.Tensor], cfg: QuantConfig) -> list[str]:
    """Names of the 2D float tensors that get quantized (at least `quant_min_numel` entries, not skipped)."""
    skip = cfg.patterns("skip_patterns")
    return [n for n, t in state_dict.items()
            if t.dim() == 2 and t.is_floating_point() and t.numel() >= cfg.quant_min_numel
            and not any(p in n for p in skip)]


@dataclass
class PreparedHessian:
    u: torch.Tensor     # fp32 (cols, cols): upper Cholesky factor of H^-1 in act-order
    perm: torch.Tensor  # (cols,) quantization order
    dead: torch.Tensor  # (cols,) bool, original order


def prepare_hessians(hs: list[torch.Tensor], damp: float = 0.01, act_order: bool = True) -> list[PreparedHessian]:
    """Dead columns, damping, act-order and the Cholesky factor of the inverse, batched over equal widths (fp64)."""
    if not hs:
        return []
    h = torch.stack([x.double() for x in hs])
    m, c, _ = h.shape
    idx = torch.arange(c, device=h.device)
    diag = h[:, idx, idx]
    dead = diag <= 0
    diag = torch.where(dead, torch.ones_like(diag), diag)
    h[:, idx, idx] = diag
    h[dead.unsqueeze(1).expand(m, c, c) | dead.unsqueeze(2).expand(m, c, c)] = 0.0
    h[:, idx, idx] = diag + damp * diag.mean(dim=1, keepdim=True)
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True, stable=True)
    else:
        perm = idx.unsqueeze(0).expand(m, c).clone()
    h = h.gather(1, perm[:, :, None].expand(m, c, c)).gather(2, perm[:, None, :].expand(m, c, c))
    scale = h[:, idx, idx].mean(dim=1)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if not bool((info != 0).any()):
            break
        bad = info != 0
        h[bad] += (0.1 * 10 ** attempt) * scale[bad, None, None] * torch.eye(c, dtype=h.dtype, device=h.device)
    else:
        raise RuntimeError("GPTQ: a Hessian stayed singular after heavy damping")
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
    return [PreparedHessian(u[i], perm[i], dead[i]) for i in range(m)]


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> float:
    """tr(E H E^T), the change of the layer's summed squared output (||E||^2 without H)."""
    e = (w - w_hat).float()
    if h is None:
        return float((e * e).sum())
    return float(((e @ h.float()) * e).sum())


def _choose_awq(w: torch.Tensor, h: torch.Tensor, bits: int, k: float, alphas: list[float],
                hadamard_seed: int | None) -> torch.Tensor:
    """The AWQ factors (over `alphas`) with the smallest Hessian-weighted round-to-nearest error."""
    best, best_err = None, float("inf")
    qm = qmax_of(bits)
    for alpha in alphas:
        a = awq_scales(torch.diagonal(h), alpha)
        w2, _ = awq_apply(w, None, a)
        if hadamard_seed is not None:
            w2 = hadamard_rotate(w2, hadamard_seed)
        s = clip_mod.sdclip_scales(w2, bits, k)
        back = clip_mod.rtn(w2, s, qm) * s[:, None]
        if hadamard_seed is not None:
            back = hadamard_unrotate(back, hadamard_seed)
        err = hessian_error(w, awq_undo(back, a), h)
        if err < best_err:
            best, best_err = a, err
    return best


def quantize_weights(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor | None],
                     cfg: QuantConfig, symbol_budget: float | None = None, device: torch.device | str | None = None,
                     kernel: Callable = gptq_quantize, measure: bool = True,
                     to_cpu: bool = True) -> tuple[dict[str, QTensor], dict]:
    """Quantize matrices with GPTQ (or round to nearest); returns QTensors and a report.

    `symbol_budget` (bytes for codes + row scales) drives the adaptive clip and the mixed bit allocation.
    `kernel` has the signature of pgolf.kernels.gptq.gptq_quantize (swap in the reference to compare).
    `measure` computes each tensor's Hessian-weighted error (needed by LQER); `to_cpu` moves results to the CPU.
    """
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_device: dict[int, torch.Tensor] = {}

    def to_dev(h: torch.Tensor | None) -> torch.Tensor | None:
        if h is None:
            return None
        if id(h) not in on_device:
            on_device[id(h)] = h.to(device=device, dtype=torch.float32)
        return on_device[id(h)]

    names = list(weights)
    w_orig = {n: weights[n].to(device=device, dtype=torch.float32) for n in names}
    h_orig = {n: to_dev(hessians.get(n)) for n in names}
    seed = cfg.hadamard_seed if cfg.hadamard else None
    bits = {n: cfg.bits_for(n) for n in names}
    ks = {n: cfg.clip_sigmas_for(n) for n in names}

    # 1. transforms (shared Hessians stay shared when no per-tensor AWQ factors are involved)
    w_t, h_t, awq = {}, {}, {}
    rotated: dict[int, torch.Tensor] = {}
    for n in names:
        w, h = w_orig[n], h_orig[n]
        a = None
        if cfg.awq and h is not None:
            a = _choose_awq(w, h, bits[n], ks[n], cfg.awq_alpha_list(), seed)
            w, h = awq_apply(w, h, a)
        if seed is not None:
            w = hadamard_rotate(w, seed)
            if h is not None:
                if a is None:
                    if id(h) not in rotated:
                        rotated[id(h)] = hadamard_rotate_hessian(h, seed)
                    h = rotated[id(h)]
                else:
                    h = hadamard_rotate_hessian(h, seed)
        w_t[n], h_t[n], awq[n] = w, h, a
    t_transform = time.perf_counter()

    # 2. bits and clip k under the budget, then per-row scales
    if symbol_budget is not None and (cfg.mixed_bits or cfg.clip_mode == "adaptive"):
        models = {n: clip_mod.SizeModel(w_t[n], None if h_t[n] is None else torch.diagonal(h_t[n]),
                                        clip_mode=cfg.clip_mode, percentile=cfg.clip_percentile)
                  for n in names}
        if cfg.mixed_bits:
            bits = clip_mod.allocate_bits(models, ks, cfg.bits_choice_list(), symbol_budget)
        if cfg.clip_mode == "adaptive":
            ks = clip_mod.adaptive_clip_sigmas(models, bits, symbol_budget, cfg.adaptive_k_min, cfg.adaptive_k_max)
    scales = {}
    for n in names:
        h_diag = None if h_t[n] is None else torch.diagonal(h_t[n])
        scales[n] = clip_mod.row_scales(w_t[n], bits[n], cfg.clip_mode, ks[n], cfg.clip_percentile, h_diag)
    t_scales = time.perf_counter()

    # 3. Hessian preparation, batched per width, once per distinct Hessian
    codes: dict[str, torch.Tensor] = {}
    use_gptq = {n: cfg.gptq and h_t[n] is not None for n in names}
    for n in names:
        if not use_gptq[n]:
            codes[n] = clip_mod.rtn(w_t[n], scales[n], qmax_of(bits[n])).to(torch.int8)
    prepared: dict[int, PreparedHessian] = {}
    by_width: dict[int, list[torch.Tensor]] = {}
    for n in names:
        if use_gptq[n] and id(h_t[n]) not in prepared:
            prepared[id(h_t[n])] = None  # placeholder keeps first-seen order
            by_width.setdefault(h_t[n].shape[0], []).append(h_t[n])
    for hs in by_width.values():
        for h, p in zip(hs, prepare_hessians(hs, cfg.gptq_damp, cfg.gptq_act_order)):
            prepared[id(h)] = p
    t_prep = time.perf_counter()

    # 4. one sweep per width over all rows of all its matrices
    groups: dict[int, list[str]] = {}
    for n in names:
        if use_gptq[n]:
            groups.setdefault(w_t[n].shape[1], []).append(n)
    for members in groups.values():
        index: dict[int, int] = {}
        entries = []
        for n in members:
            p = prepared[id(h_t[n])]
            entries.append((index.setdefault(id(p), len(index)), n, p))
        entries.sort(key=lambda e: e[0])  # rows of one matrix contiguous (stable: keeps tensor order)
        us = [None] * len(index)
        w_rows, s_rows, q_rows, m_rows = [], [], [], []
        for mi, n, p in entries:
            us[mi] = p.u
            w = w_t[n].clone()
            w[:, p.dead] = 0.0
            rows = w.shape[0]
            w_rows.append(w[:, p.perm])
            s_rows.append(scales[n])
            q_rows.append(torch.full((rows,), qmax_of(bits[n]), dtype=torch.int32, device=device))
            m_rows.append(torch.full((rows,), mi, dtype=torch.int32, device=device))
        q_all = kernel(torch.cat(w_rows), torch.stack(us), torch.cat(s_rows), torch.cat(q_rows), torch.cat(m_rows),
                       cfg.gptq_block_size)
        start = 0
        for mi, n, p in entries:
            rows = w_t[n].shape[0]
            codes[n] = q_all[start:start + rows][:, torch.argsort(p.perm)]
            start += rows
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sweep = time.perf_counter()

    # 5. QTensors, errors, LQER on the worst tensors
    out: dict[str, QTensor] = {}
    errors = {}
    measure = measure or (cfg.lqer_rank > 0 and cfg.lqer_top_k > 0)
    for n in names:
        qt = QTensor(codes[n], scales[n].half(), bits[n], str(weights[n].dtype).replace("torch.", ""),
                     None if awq[n] is None else awq[n].half(), seed)
        qt.info = {"k": ks[n]}
        if measure:
            w_hat = dequantize(qt)
            errors[n] = hessian_error(w_orig[n], w_hat, h_orig[n])
            base = hessian_error(w_orig[n], torch.zeros_like(w_hat), h_orig[n])
            qt.info["rel_error"] = errors[n] / max(base, 1e-30)
        out[n] = qt
    if cfg.lqer_rank > 0 and cfg.lqer_top_k > 0:
        for n in sorted(names, key=lambda x: errors[x], reverse=True)[:cfg.lqer_top_k]:
            qt = out[n]
            f = lqer_factors(w_orig[n] - dequantize(qt), cfg.lqer_rank, cfg.lqer_group, cfg.lqer_a_bits,
                             cfg.lqer_b_bits)
            qt.lqer = f
            err = hessian_error(w_orig[n], dequantize(qt), h_orig[n])
            qt.info["lqer_gain"] = 1.0 - err / max(errors[n], 1e-30)
    if to_cpu:
        for qt in out.values():
            qt.q, qt.scale = qt.q.cpu(), qt.scale.cpu()
            qt.awq = None if qt.awq is None else qt.awq.cpu()
            if qt.lqer is not None:
                f = qt.lqer
                qt.lqer = LQERFactors(f.a_q.cpu(), f.a_scale.cpu(), f.b_q.cpu(), f.b_scale.cpu(), f.a_bits,
                                      f.b_bits, f.group)
    t_end = time.perf_counter()
    report = {
        "seconds": {"transform": t_transform - t0, "scales": t_scales - t_transform, "hessian_prep": t_prep - t_scales,
                    "sweep": t_sweep - t_prep, "finish": t_end - t_sweep, "total": t_end - t0},
        "tensors": {n: {"shape": list(out[n].shape), "bits": out[n].bits, **out[n].info} for n in names},
        "distinct_hessians": len(prepared),
    }
    return out, report


def gptq_core(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor | None], cfg: QuantConfig,
              kernel: Callable = gptq_quantize) -> dict[str, torch.Tensor]:
    """Codes only (no transforms, no LQER, no reporting): what the speed target times. Inputs on the device."""
    cfg = cfg.replace(lqer_rank=0, hadamard=False, awq=False, mixed_bits=False,
                      clip_mode="sdclip" if cfg.clip_mode == "adaptive" else cfg.clip_mode)
    qts, _ = quantize_weights(weights, hessians, cfg, device=next(iter(weights.values())).device, kernel=kernel,
                              measure=False, to_cpu=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {n: qt.q for n, qt in qts.items()}
