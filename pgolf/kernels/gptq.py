"""GPTQ's blocked column sweep with error feedback: a Triton kernel over all rows, and its eager reference.

Inputs are prepared by pgolf.quant.gptq (damping, dead columns, act-order, Cholesky): columns are already in
quantization order and `hinv_u` is the upper Cholesky factor U of H^-1 (H^-1 = U^T U) in that order. Once the
per-row scales are fixed, rows are independent, so the kernel gives each program BLOCK_R rows of one matrix and
walks all column blocks:

    for each block of `block_size` columns [i1, i2):
        for j in the block:  q_j = clamp(floor(w_j / s + 1/2), -qmax, qmax)
                             e_j = (w_j - q_j s) / U_jj;   w_(j+1:i2) -= e_j U_j,(j+1:i2)
        w_(i2:) -= E U_(i1:i2),(i2:)          (one matrix product per block)

Rounding is half-up (floor(x + 1/2)) in both versions so that they give the same integers whenever the float
inputs agree. Many matrices of the same width go in one launch: `row_matrix` says which U each row uses.
"""
from __future__ import annotations

import torch

from pgolf.kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _normalize(w: torch.Tensor, hinv_u: torch.Tensor, scale: torch.Tensor, qmax: int | torch.Tensor,
               row_matrix: torch.Tensor | None):
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize: w must be (rows, cols), got shape {tuple(w.shape)}")
    n, c = w.shape
    u = hinv_u if hinv_u.dim() == 3 else hinv_u.unsqueeze(0)
    if u.shape[1:] != (c, c):
        raise ValueError(f"gptq_quantize: hinv_u must be ({c}, {c}) or (M, {c}, {c}), got {tuple(hinv_u.shape)}")
    if scale.shape != (n,):
        raise ValueError(f"gptq_quantize: scale must be ({n},), got {tuple(scale.shape)}")
    if row_matrix is None:
        if u.shape[0] != 1:
            raise ValueError("gptq_quantize: row_matrix is needed when hinv_u holds several matrices")
        row_matrix = torch.zeros(n, dtype=torch.int32, device=w.device)
    if row_matrix.shape != (n,):
        raise ValueError(f"gptq_quantize: row_matrix must be ({n},), got {tuple(row_matrix.shape)}")
    if not isinstance(qmax, torch.Tensor):
        qmax = torch.full((n,), int(qmax), dtype=torch.int32, device=w.device)
    if qmax.shape != (n,):
        raise ValueError(f"gptq_quantize: qmax must be an int or ({n},), got {tuple(qmax.shape)}")
    return (w.float(), u.float(), scale.float(), qmax.to(device=w.device, dtype=torch.int32),
            row_matrix.to(device=w.device))


def _segments(row_matrix: torch.Tensor) -> list[tuple[int, int, int]]:
    """(matrix, first row, end row) of each run of equal `row_matrix`; runs must not repeat a matrix."""
    if row_matrix.numel() == 0:
        return []
    values, counts = torch.unique_consecutive(row_matrix, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if len(set(values)) != len(values):
        raise ValueError("gptq_quantize: rows of one matrix must be contiguous in row_matrix")
    out, start = [], 0
    for m, k in zip(values, counts):
        out.append((int(m), start, start + int(k)))
        start += int(k)
    return out


def _sweep_reference(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, qmax: torch.Tensor,
                     block_size: int) -> torch.Tensor:
    rows, cols = w.shape
    w = w.clone()
    q_out = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    s = scale[:, None]
    qm = qmax.float()[:, None]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            wj = w1[:, j:j + 1]
            q = torch.clamp(torch.floor(wj / s + 0.5), -qm, qm)
            q_out[:, i1 + j] = q[:, 0].to(torch.int8)
            e = (wj - q * s) / u[i1 + j, i1 + j]
            w1[:, j + 1:] -= e * u[i1 + j, i1 + j + 1:i2][None, :]
            err[:, j:j + 1] = e
        if i2 < cols:
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return q_out


def gptq_quantize_reference(w: torch.Tensor, hinv_u: torch.Tensor, scale: torch.Tensor, qmax: int | torch.Tensor,
                            row_matrix: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """Eager GPTQ sweep. w (N, C), hinv_u (C, C) or (M, C, C), scale (N,), qmax int or (N,) -> int8 (N, C)."""
    w, u, scale, qmax, row_matrix = _normalize(w, hinv_u, scale, qmax, row_matrix)
    out = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for m, r0, r1 in _segments(row_matrix):
        out[r0:r1] = _sweep_reference(w[r0:r1], u[m], scale[r0:r1], qmax[r0:r1], block_size)
    return out


if triton is not None:

    @triton.jit
    def _gptq_sweep_kernel(W, U, S, QM, Q, P_ROW0, P_NROWS, P_MAT, C,
                           BLOCK_R: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        row0 = tl.load(P_ROW0 + pid)
        nrows = tl.load(P_NROWS + pid)
        mat = tl.load(P_MAT + pid).to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        rmask = r < nrows
        rows = (row0 + r).to(tl.int64)
        s = tl.load(S + rows, mask=rmask, other=1.0)
        qm = tl.load(QM + rows, mask=rmask, other=1).to(tl.float32)
        u_base = U + mat * C * C
        k = tl.arange(0, BS)
        for i1 in range(0, C, BS):
            cols = i1 + k
            cmask = cols < C
            tile_mask = rmask[:, None] & cmask[None, :]
            wt = tl.load(W + rows[:, None] * C + cols[None, :], mask=tile_mask, other=0.0)
            qt = tl.zeros((BLOCK_R, BS), dtype=tl.float32)
            et = tl.zeros((BLOCK_R, BS), dtype=tl.float32)
            nb = tl.minimum(C - i1, BS)
            # row j of U (right of the diagonal) and U_jj, loaded one step ahead when PREFETCH
            urow_next = tl.load(u_base + i1 * C + cols, mask=cmask & (cols > i1), other=0.0)
            d_next = tl.load(u_base + i1 * C + i1)
            for j in range(0, nb):
                jj = i1 + j
                sel = (k == j)[None, :]
                if PREFETCH:
                    urow = urow_next
                    d = d_next
                    jn = tl.minimum(jj + 1, C - 1)  # past the block's end: a valid, unused row
                    urow_next = tl.load(u_base + jn * C + cols, mask=cmask & (cols > jn), other=0.0)
                    d_next = tl.load(u_base + jn * C + jn)
                else:
                    d = tl.load(u_base + jj * C + jj)
                    urow = tl.load(u_base + jj * C + cols, mask=cmask & (cols > jj), other=0.0)
                wj = tl.sum(tl.where(sel, wt, 0.0), axis=1)
                q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(wj, s) + 0.5), -qm), qm)
                e = tl.math.div_rn(wj - q * s, d)
                wt = wt - e[:, None] * urow[None, :]
                qt = tl.where(sel, q[:, None], qt)
                et = tl.where(sel, e[:, None], et)
            tl.store(Q + rows[:, None] * C + cols[None, :], qt.to(tl.int8), mask=tile_mask)
            for n0 in range(i1 + BS, C, BN):
                ncols = n0 + tl.arange(0, BN)
                nmask = ncols < C
                wn_ptr = W + rows[:, None] * C + ncols[None, :]
                wn = tl.load(wn_ptr, mask=rmask[:, None] & nmask[None, :], other=0.0)
                ub = tl.load(u_base + cols[:, None] * C + ncols[None, :], mask=cmask[:, None] & nmask[None, :],
                             other=0.0)
                wn = wn - tl.dot(et, ub, input_precision="ieee")
                tl.store(wn_ptr, wn, mask=rmask[:, None] & nmask[None, :])


def _programs(row_matrix: torch.Tensor, block_r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One program per `block_r` rows of one matrix: first row, row count and matrix of each program."""
    row0, nrows, mats = [], [], []
    for m, r0, r1 in _segments(row_matrix):
        for a in range(r0, r1, block_r):
            row0.append(a)
            nrows.append(min(block_r, r1 - a))
            mats.append(m)
    dev = row_matrix.device
    as_t = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
    return as_t(row0), as_t(nrows), as_t(mats)


def gptq_quantize_triton(w: torch.Tensor, hinv_u: torch.Tensor, scale: torch.Tensor, qmax: int | torch.Tensor,
                         row_matrix: torch.Tensor | None = None, block_size: int = 128, block_r: int = 16,
                         num_warps: int = 4, prefetch: bool = True) -> torch.Tensor:
    """The Triton sweep (same contract as the reference); `block_r`, `num_warps`, `prefetch` are tuning knobs."""
    if triton is None:
        raise RuntimeError("gptq_quantize_triton: Triton is not importable")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"gptq_quantize_triton: block_size must be a power of two >= 16, not {block_size}")
    w, u, scale, qmax, row_matrix = _normalize(w, hinv_u, scale, qmax, row_matrix)
    n, c = w.shape
    out = torch.empty(n, c, dtype=torch.int8, device=w.device)
    if n == 0 or c == 0:
        return out
    work = w.contiguous().clone()
    p_row0, p_nrows, p_mat = _programs(row_matrix, block_r)
    _gptq_sweep_kernel[(p_row0.numel(),)](work, u.contiguous(), scale.contiguous(), qmax.contiguous(), out,
                                          p_row0, p_nrows, p_mat, c, BLOCK_R=block_r, BS=block_size, BN=64,
                                          PREFETCH=prefetch, num_warps=num_warps)
    return out


def gptq_quantize(w: torch.Tensor, hinv_u: torch.Tensor, scale: torch.Tensor, qmax: int | torch.Tensor,
                  row_matrix: torch.Tensor | None = None, block_size: int = 128) -> torch.Tensor:
    """GPTQ sweep: Triton on CUDA (power-of-two blocks), the eager reference elsewhere."""
    if use_triton(w) and block_size >= 16 and not block_size & (block_size - 1):
        return gptq_quantize_triton(w, hinv_u, scale, qmax, row_matrix, block_size)
    return gptq_quantize_reference(w, hinv_u, scale, qmax, row_matrix, block_size)
