"""Per-row scales (chosen before the GPTQ sweep), a size model, and the budget-driven choices built on it.

Scale rules (s = step of row i, codes in [-qmax, qmax]):
- sdclip:     s = k * std(row) / qmax, k per tensor class (the record line's rule);
- absmax:     s = max|row| / qmax;
- percentile: s = P_p(|row|) / qmax;
- search:     per row, the clip ratio of max|row| in a grid that minimizes the round-to-nearest error weighted by
              the Hessian diagonal;
- adaptive:   SDClip with a per-tensor k in [k_min, k_max]: log k_t = offset - 1/2 log(var_t * mean diag H_t),
              the offset binary-searched so that the estimated compressed size meets a byte budget.

Why the adaptive rule: with step s_t = k_t sigma_t / qmax, tensor t adds about n_t s_t^2 mean(diag H_t) / 12 to
the output error and costs about n_t (c - log2 k_t) bits (entropy of a Gaussian quantized with step s_t).
Minimizing error under a total size gives k_t^2 proportional to 1 / (sigma_t^2 mean diag H_t): tensors whose
inputs are loud or whose rows are wide get finer steps. Larger k means fewer distinct codes, so smaller
artifacts: k trades size for error, which is what the budget search exploits.

Sizes are estimated as the order-0 entropy of the codes (what the rANS coder in compress.py reaches to within a
fraction of a percent) plus 2 bytes of fp16 scale per row, from a sample of rows.
"""
from __future__ import annotations

import math
import warnings

import torch

from pgolf.quant.bits import qmax as qmax_of

_SCALE_FLOOR = 1e-6
_LOG_K_STEP = 0.01  # grid of the size model in log k
K_RULES = ("sdclip", "adaptive")  # clip rules whose scale is k std(row) / qmax; the others set each row's scale


def round_scale(s: torch.Tensor) -> torch.Tensor:
    """Scales are stored as fp16: quantize with exactly the stored value."""
    return s.float().clamp_min(_SCALE_FLOOR).half().float()


def rtn(w: torch.Tensor, s: torch.Tensor, qmax: int | torch.Tensor) -> torch.Tensor:
    """Round to nearest (half up, as the GPTQ kernel does) with per-row scales, clamped to [-qmax, qmax]."""
    qm = qmax if isinstance(qmax, int) else qmax.float()[:, None]
    q = torch.floor(w / s[:, None] + 0.5)
    return torch.clamp(q, -qm, qm) if isinstance(qm, torch.Tensor) else q.clamp(-qm, qm)


def sdclip_scales(w: torch.Tensor, bits: int, k: float) -> torch.Tensor:
    return round_scale(k * w.float().std(dim=1, correction=0) / qmax_of(bits))


def absmax_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    return round_scale(w.float().abs().amax(dim=1) / qmax_of(bits))


def percentile_scales(w: torch.Tensor, bits: int, percentile: float) -> torch.Tensor:
    a = w.float().abs().sort(dim=1).values
    idx = min(a.shape[1] - 1, max(0, math.ceil(percentile / 100.0 * a.shape[1]) - 1))
    return round_scale(a[:, idx] / qmax_of(bits))


def search_scales(w: torch.Tensor, bits: int, h_diag: torch.Tensor | None = None, steps: int = 20,
                  lowest: float = 0.3) -> torch.Tensor:
    """Per row, the clip ratio r in [lowest, 1] of max|row| minimizing sum_j H_jj (w_j - deq_j)^2."""
    w = w.float()
    qm = qmax_of(bits)
    weight = torch.ones(w.shape[1], device=w.device) if h_diag is None else h_diag.float().to(w.device)
    amax = w.abs().amax(dim=1)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best = round_scale(amax / qm)
    for r in torch.linspace(lowest, 1.0, steps).tolist():
        s = round_scale(amax * r / qm)
        err = ((w - rtn(w, s, qm) * s[:, None]) ** 2 * weight[None, :]).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def row_scales(w: torch.Tensor, bits: int, mode: str, k: float | None = None, percentile: float = 99.95,
               h_diag: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row scales of one matrix under one rule ("adaptive" is SDClip with a searched k)."""
    if mode in K_RULES:
        if k is None:
            raise ValueError(f"row_scales: clip mode {mode!r} needs k")
        return sdclip_scales(w, bits, k)
    if mode == "absmax":
        return absmax_scales(w, bits)
    if mode == "percentile":
        return percentile_scales(w, bits, percentile)
    if mode == "search":
        return search_scales(w, bits, h_diag)
    raise ValueError(f"row_scales: unknown clip mode {mode!r}")


def entropy_bits(q: torch.Tensor, bits: int) -> float:
    """Order-0 entropy (bits per symbol) of integer codes of width `bits`."""
    counts = torch.bincount((q.reshape(-1).long() + (1 << (bits - 1))), minlength=1 << bits).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


class SizeModel:
    """Entropy of a tensor's codes under its clip rule as a function of k and bits, from a sample of rows.

    SDClip (and adaptive): with s = k std_row / qmax the codes depend only on z = w / std_row, so one sample serves
    every k. Other rules (percentile, absmax, search) set each row's scale themselves and ignore k: their codes are
    those of `row_scales` on the sampled rows. Sized as SDClip codes, percentile-99.95 int6 codes came out at 0.66 of
    their real entropy (notes/quant.md), and the over-budget fallback's first allocation far over the budget.
    """

    def __init__(self, w: torch.Tensor, h_diag: torch.Tensor | None = None, sample_rows: int = 256,
                 clip_mode: str = "sdclip", percentile: float = 99.95):
        w = w.float()
        self.rows, self.cols = w.shape
        step = max(1, self.rows // sample_rows)
        self.sample = w[::step][:sample_rows]
        self.std = self.sample.std(dim=1, correction=0, keepdim=True).clamp_min(1e-12)
        self.z = self.sample / self.std
        self.clip_mode, self.percentile = clip_mode, percentile
        self.row_var = float(w.var(dim=1, correction=0).mean())
        self.h_mean = float(h_diag.float().mean()) if h_diag is not None else 1.0
        self.h_diag = None if h_diag is None else h_diag.float().to(w.device)
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._rule_cache: dict[int, tuple[float, float]] = {}

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def takes_k(self) -> bool:
        """True when the clip rule takes k (SDClip, adaptive); False when it sets each row's scale itself."""
        return self.clip_mode in K_RULES

    def _code_stats(self, bits: int, q: torch.Tensor, step_z: torch.Tensor | float) -> tuple[float, float]:
        """(entropy bits/symbol, mean weighted error in units of the row variance) of codes `q` of the sampled
        rows with steps `step_z` in z units."""
        err = (self.z - q * step_z) ** 2
        if self.h_diag is not None:
            err = err * self.h_diag[None, :]
        return entropy_bits(q, bits), float(err.mean())

    def _grid_stats(self, bits: int, g: int) -> tuple[float, float]:
        key = (bits, g)
        if key not in self._cache:
            k, qm = math.exp(g * _LOG_K_STEP), qmax_of(bits)
            q = torch.clamp(torch.floor(self.z * (qm / k) + 0.5), -qm, qm)
            self._cache[key] = self._code_stats(bits, q, k / qm)
        return self._cache[key]

    def _rule_stats(self, bits: int) -> tuple[float, float]:
        if bits not in self._rule_cache:
            s = row_scales(self.sample, bits, self.clip_mode, percentile=self.percentile, h_diag=self.h_diag)
            q = rtn(self.sample, s, qmax_of(bits))
            self._rule_cache[bits] = self._code_stats(bits, q, s[:, None] / self.std)
        return self._rule_cache[bits]

    def _stats(self, bits: int, k: float) -> tuple[float, float]:
        """(entropy bits/symbol, error) at k, interpolated in log k between grid points 1% apart (cached);
        the clip rule's own scales when it ignores k."""
        if not self.takes_k:
            return self._rule_stats(bits)
        x = math.log(k) / _LOG_K_STEP
        g = math.floor(x)
        lo, hi = self._grid_stats(bits, g), self._grid_stats(bits, g + 1)
        t = x - g
        return lo[0] + t * (hi[0] - lo[0]), lo[1] + t * (hi[1] - lo[1])

    def nbytes(self, bits: int, k: float) -> float:
        """Estimated compressed bytes of codes plus fp16 row scales."""
        return self.numel * self._stats(bits, k)[0] / 8 + 2 * self.rows

    def error(self, bits: int, k: float) -> float:
        """Hessian-weighted round-to-nearest error of the whole tensor, in units of its row variance."""
        return self._stats(bits, k)[1] * self.numel * self.row_var

    def sensitivity(self) -> float:
        return max(self.row_var * self.h_mean, 1e-30)


def adaptive_clip_sigmas(models: dict[str, SizeModel], bits: dict[str, int], budget_bytes: float,
                         k_min: float = 6.0, k_max: float = 24.0, iters: int = 40) -> dict[str, float]:
    """Per-tensor k from the sensitivity rule, with the offset binary-searched to fit `budget_bytes`."""
    if not models:
        return {}
    base = {n: -0.5 * math.log(m.sensitivity()) for n, m in models.items()}
    center = sum(base.values()) / len(base)

    def ks(offset: float) -> dict[str, float]:
        return {n: min(k_max, max(k_min, math.exp(offset + base[n] - center))) for n in models}

    def size(offset: float) -> float:
        return sum(models[n].nbytes(bits[n], k) for n, k in ks(offset).items())

    spread = max(abs(b - center) for b in base.values())
    lo, hi = math.log(k_min) - spread, math.log(k_max) + spread
    if size(hi) > budget_bytes:
        warnings.warn(f"adaptive clip: even k={k_max} everywhere ({size(hi):.0f} B) exceeds the budget "
                      f"({budget_bytes:.0f} B); using it anyway", RuntimeWarning, stacklevel=2)
        return ks(hi)
    if size(lo) <= budget_bytes:
        return ks(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if size(mid) > budget_bytes:
            lo = mid
        else:
            hi = mid
    return ks(hi)


def allocate_bits(models: dict[str, SizeModel], ks: dict[str, float], choices: list[int], budget_bytes: float,
                  floor: dict[str, int] | None = None) -> dict[str, int]:
    """Greedy mixed precision: start every tensor at its lowest width, then repeatedly widen the tensor with the
    largest error reduction per added byte while the estimated total stays within `budget_bytes`."""
    choices = sorted(choices)
    floor = floor or {}
    bits = {n: max(choices[0], min(floor.get(n, choices[0]), choices[-1])) for n in models}
    total = sum(models[n].nbytes(bits[n], ks[n]) for n in models)
    if total > budget_bytes:
        warnings.warn(f"mixed bits: the narrowest widths already need {total:.0f} B > budget {budget_bytes:.0f} B",
                      RuntimeWarning, stacklevel=2)
        return bits
    while True:
        best, best_gain, best_cost = None, 0.0, 0.0
        for n, m in models.items():
            wider = [b for b in choices if b > bits[n]]
            if not wider:
                continue
            b2 = wider[0]
            cost = m.nbytes(b2, ks[n]) - m.nbytes(bits[n], ks[n])
            gain = m.error(bits[n], ks[n]) - m.error(b2, ks[n])
            if total + cost > budget_bytes:
                continue
            ratio = gain / max(cost, 1e-9)
            if best is None or ratio > best_gain:
                best, best_gain, best_cost = n, ratio, cost
        if best is None:
            return bits
        bits[best] = [b for b in choices if b > bits[best]][0]
        total += best_cost
