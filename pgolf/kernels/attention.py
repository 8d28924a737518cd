"""Causal GQA attention over packed documents, with XSA (exclusive self attention) optional.

q (T, Hq, D), k and v (T, Hkv, D) hold all tokens of a batch packed end to end; `cu_seqlens` (int32, N+1)
marks document starts (a batch of fixed-length rows is the special case of equal lengths). Query head h reads
KV head h // (Hq // Hkv). Scale 1/sqrt(D); QK gain and Q/K norms are applied by the caller.
XSA: y_t = o_t - (o_t . v̂_t) v̂_t, v̂_t = v_t / max(||v_t||, eps), v_t the token's own value of that KV head.

Two paths on CUDA (notes/attention.md has the measurements that pick the default):
- fused: a varlen flash attention in Triton, forward and backward, XSA in the forward epilogue and in the
  backward kernels' prologue (dq) and epilogue (dk/dv). Document masking needs no per-document grid: each query
  block walks the keys from the document start of its first row to its last row, masking per row with that
  row's document start, so a block may straddle documents and no program is idle. fp32 inputs on a GPU get
  tf32 matmuls (bf16 is the intended dtype).
- unfused: flash_attn's varlen function where `import flash_attn` works, else cuDNN SDPA for equal-length
  documents or FlexAttention with a document mask, and a compiled XSA after it.
`PGOLF_ATTENTION=fused|unfused` overrides the default.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import compute_dtype, interpreting, say_once, triton_available, use_triton

XSA_EPS = 1e-6
DEFAULT_BACKEND = "fused"


def library_is_faster(xsa: bool, rows: int, max_seqlen: int, total: int) -> bool:
    """Where `fused` mode still hands a call to the library path: equal-length documents without XSA, where cuDNN
    SDPA measured 2.350 ms fwd+bwd against the fused kernel's 2.378 (H100, 48 x 2048, 2026-11-25; 2.273 against
    2.347 the day before). With XSA the fused kernel wins (2.557 against cuDNN + XSA 2.621) and with document
    masking there is no cuDNN path (FlexAttention: 2.94 against 1.90 without XSA)."""
    return not xsa and rows * max_seqlen == total


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


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    where = "pgolf/kernels/attention.py"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{where}: q, k, v must be packed (T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: k and v must be (T, Hkv, D) matching q (T, Hq, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{where}: query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"{where}: cu_seqlens must be 1-D int32 with N+1 >= 2 entries; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if max(x.stride(0) * x.shape[0] for x in (q, k, v)) >= 2**31:
        raise ValueError(f"{where}: the kernels index with int32; split batches of 2**31 or more elements")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{where}: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              xsa: bool = True) -> torch.Tensor:
    """The attention the model calls: the fastest correct path on CUDA, the reference elsewhere."""
    _check_inputs(q, k, v, cu_seqlens)
    if use_triton(q):
        dt = compute_dtype(q)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if q.is_cuda and (backend() == "unfused"
                          or library_is_faster(xsa, cu_seqlens.numel() - 1, max_seqlen, q.shape[0])):
            return attention_unfused(q, k, v, cu_seqlens, max_seqlen, xsa)
        return fused_attention(q, k, v, cu_seqlens, xsa)
    if q.is_cuda:  # PyTorch's own kernels (cuDNN SDPA / FlexAttention), not the per-document loop
        return attention_unfused(q, k, v, cu_seqlens, max_seqlen, xsa)
    return attention_reference(q, k, v, cu_seqlens, max_seqlen, xsa)


def backend() -> str:
    value = os.environ.get("PGOLF_ATTENTION", DEFAULT_BACKEND).lower()
    if value not in ("fused", "unfused"):
        raise ValueError(f"PGOLF_ATTENTION must be fused or unfused, not {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Fused path: Triton kernels
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Tile of one kernel: block_m query rows by block_n key rows, for `heads` query heads of one KV group at
    once (forward and dq stack them into a (heads * block_m)-row tile that shares each K/V tile load)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    heads: int = 1


# Tuned on an H100 (notes/attention.md); the interpreter gets small blocks so tests cross block boundaries.
FWD_CONFIG = KernelConfig(64, 64, 8, 3, 2)
DKDV_CONFIG = KernelConfig(64, 64, 4, 3)
DQ_CONFIG = KernelConfig(64, 64, 4, 3, 2)
INTERPRET_CONFIG = KernelConfig(16, 16, 1, 1, 2)

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _load_kv(k_ptr, v_ptr, n, T, s_kt, s_vt, D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
        """Key and value tiles of columns n..n+BN (rows past T read as zero when MASK)."""
        cols = n + tl.arange(0, BN)
        dims = tl.arange(0, D)
        if MASK:
            k = tl.load(k_ptr + cols[:, None] * s_kt + dims[None, :], mask=(cols < T)[:, None], other=0.0)
            v = tl.load(v_ptr + cols[:, None] * s_vt + dims[None, :], mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + cols[:, None] * s_kt + dims[None, :])
            v = tl.load(v_ptr + cols[:, None] * s_vt + dims[None, :])
        return cols, k, v

    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, n, rows, doc_start, T, qk_scale, s_kt, s_vt,
                  D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
        cols, k, v = _load_kv(k_ptr, v_ptr, n, T, s_kt, s_vt, D, BN, MASK)
        s = tl.dot(q, tl.trans(k))
        if MASK:
            valid = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= doc_start[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _query_tile(Q, T, s_qt, s_qh, GROUP: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
        """This program's query tile: HP heads of one KV group x BM rows stacked as HP * BM tile rows, later
        (heavier) causal blocks first. Returns (m0, kv group, rows, heads, row mask, dims, q)."""
        h0 = tl.program_id(0) * HP
        m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BM
        r = tl.arange(0, HP * BM)
        rows = m0 + r % BM
        heads = h0 + r // BM
        row_ok = rows < T
        dims = tl.arange(0, D)
        q = tl.load(Q + rows[:, None] * s_qt + heads[:, None] * s_qh + dims[None, :], mask=row_ok[:, None],
                    other=0.0)
        return m0, h0 // GROUP, rows, heads, row_ok, dims, q

    @triton.jit
    def _block_walk(T, m0, BOUNDS, BM: tl.constexpr, BN: tl.constexpr):
        """Key blocks of a query block: from the document start of its first row to its last row. Blocks
        [0, j_a) reach before some row's own document start, [j_b, n) cross the diagonal; [j_a, j_b) need no mask."""
        last = tl.minimum(m0 + BM, T) - 1
        lo = tl.load(BOUNDS + m0)
        n_blocks = tl.cdiv(last + 1 - lo, BN)
        j_a = tl.cdiv(tl.load(BOUNDS + last) - lo, BN)
        j_b = tl.maximum((m0 - lo + 1) // BN, j_a)
        return lo, j_a, j_b, n_blocks

    @triton.jit
    def _fwd_kernel(Q, K, V, Y, LSE, C, BOUNDS, T, qk_scale, eps,
                    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
                    HQ: tl.constexpr, GROUP: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, XSA: tl.constexpr):
        """One program: HP query heads of one KV group x BM rows, stacked as HP * BM tile rows."""
        m0, g, rows, heads, row_ok, dims, q = _query_tile(Q, T, s_qt, s_qh, GROUP, HP, D, BM)
        doc_start = tl.load(BOUNDS + rows, mask=row_ok, other=0)
        lo, j_a, j_b, n_blocks = _block_walk(T, m0, BOUNDS, BM, BN)
        k_ptr = K + g * s_kh
        v_ptr = V + g * s_vh
        acc = tl.zeros([HP * BM, D], dtype=tl.float32)
        m_i = tl.full([HP * BM], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([HP * BM], dtype=tl.float32)
        for j in range(0, j_a):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                                      s_kt, s_vt, D, BN, True)
        for j in range(j_a, j_b):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                                      s_kt, s_vt, D, BN, False)
        for j in range(j_b, n_blocks):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                                      s_kt, s_vt, D, BN, True)
        o = acc / l_i[:, None]
        tl.store(LSE + heads * T + rows, m_i + tl.log2(l_i), mask=row_ok)
        if XSA:
            vs = tl.load(v_ptr + rows[:, None] * s_vt + dims[None, :], mask=row_ok[:, None], other=0.0)
            vs = vs.to(tl.float32)
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(vs * vs, 1)), eps)
            v_hat = vs * inv[:, None]
            c = tl.sum(o * v_hat, 1)
            o = o - c[:, None] * v_hat
            tl.store(C + heads * T + rows, c, mask=row_ok)
        tl.store(Y + rows[:, None] * (HQ * D) + heads[:, None] * D + dims[None, :], o.to(Y.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, n, rows, doc_start, T, qk_scale, s_kt, s_vt,
                 D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
        cols, k, v = _load_kv(k_ptr, v_ptr, n, T, s_kt, s_vt, D, BN, MASK)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASK:
            valid = (cols[None, :] <= rows[:, None]) & (cols[None, :] >= doc_start[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DY, Y, C, DO, LSE, DELTA, DQ, BOUNDS, T, qk_scale, sm_scale, eps,
                       s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
                       HQ: tl.constexpr, GROUP: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, XSA: tl.constexpr):
        """Runs before the dk/dv kernel and hands it, for its own rows: delta = rowsum(dy * y), which equals
        do . o because the XSA projection is symmetric and idempotent, and with XSA do = dy - (dy . v̂) v̂.
        Then the forward's walk over keys, recomputing P from the saved log-sum-exp."""
        m0, g, rows, heads, row_ok, dims, q = _query_tile(Q, T, s_qt, s_qh, GROUP, HP, D, BM)
        offs = rows[:, None] * (HQ * D) + heads[:, None] * D + dims[None, :]
        dy = tl.load(DY + offs, mask=row_ok[:, None], other=0.0)
        y = tl.load(Y + offs, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(dy.to(tl.float32) * y.to(tl.float32), 1)
        tl.store(DELTA + heads * T + rows, delta, mask=row_ok)
        if XSA:
            vs = tl.load(V + rows[:, None] * s_vt + g * s_vh + dims[None, :], mask=row_ok[:, None], other=0.0)
            vs = vs.to(tl.float32)
            v_hat = vs * (1.0 / tl.maximum(tl.sqrt(tl.sum(vs * vs, 1)), eps))[:, None]
            dy32 = dy.to(tl.float32)
            do = (dy32 - tl.sum(dy32 * v_hat, 1)[:, None] * v_hat).to(DO.dtype.element_ty)
            tl.store(DO + offs, do, mask=row_ok[:, None])
        else:
            do = dy
        lse = tl.load(LSE + heads * T + rows, mask=row_ok, other=0.0)
        doc_start = tl.load(BOUNDS + rows, mask=row_ok, other=0)
        lo, j_a, j_b, n_blocks = _block_walk(T, m0, BOUNDS, BM, BN)
        k_ptr = K + g * s_kh
        v_ptr = V + g * s_vh
        dq = tl.zeros([HP * BM, D], dtype=tl.float32)
        for j in range(0, j_a):
            dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                          s_kt, s_vt, D, BN, True)
        for j in range(j_a, j_b):
            dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                          s_kt, s_vt, D, BN, False)
        for j in range(j_b, n_blocks):
            dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, lo + j * BN, rows, doc_start, T, qk_scale,
                          s_kt, s_vt, D, BN, True)
        tl.store(DQ + offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, m, cols, doc_end, T, qk_scale, s_qt,
                   HQ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, MASK: tl.constexpr):
        rows = m + tl.arange(0, BM)
        dims = tl.arange(0, D)
        if MASK:
            row_ok = rows < T
            q = tl.load(q_ptr + rows[:, None] * s_qt + dims[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + rows[:, None] * (HQ * D) + dims[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptr + rows[:, None] * s_qt + dims[None, :])
            do = tl.load(do_ptr + rows[:, None] * (HQ * D) + dims[None, :])
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASK:
            valid = (rows[None, :] >= cols[:, None]) & (rows[None, :] < doc_end[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, DY, Y, C, DO, LSE, DELTA, DK, DV, BOUNDS, T, qk_scale, sm_scale, eps,
                         s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
                         HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, XSA: tl.constexpr):
        """One block of BN keys of one KV head: walks the queries of every head of its group that can see it,
        from its first key to the end of its last key's document, so no atomics and no group reduction.
        Query blocks [0, i_a) cross the diagonal, [i_b, n) run past some key's document end."""
        g = tl.program_id(0)
        n0 = tl.program_id(1) * BN
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < T
        dims = tl.arange(0, D)
        k = tl.load(K + cols[:, None] * s_kt + g * s_kh + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * s_vt + g * s_vh + dims[None, :], mask=col_ok[:, None], other=0.0)
        doc_end = tl.load(BOUNDS + T + cols, mask=col_ok, other=0)
        last = tl.minimum(n0 + BN, T) - 1
        end_last = tl.load(BOUNDS + T + last)
        n_blocks = tl.cdiv(end_last - n0, BM)
        i_a = tl.cdiv(last - n0, BM)
        i_b = tl.maximum((tl.load(BOUNDS + T + n0) - n0) // BM, i_a)
        dk = tl.zeros([BN, D], dtype=tl.float32)
        dv = tl.zeros([BN, D], dtype=tl.float32)
        for i in range(GROUP):
            h = g * GROUP + i
            q_ptr = Q + h * s_qh
            do_ptr = DO + h * D
            lse_ptr = LSE + h * T
            delta_ptr = DELTA + h * T
            for j in range(0, i_a):
                dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, n0 + j * BM, cols, doc_end,
                                    T, qk_scale, s_qt, HQ, D, BM, True)
            for j in range(i_a, i_b):
                dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, n0 + j * BM, cols, doc_end,
                                    T, qk_scale, s_qt, HQ, D, BM, False)
            for j in range(i_b, n_blocks):
                dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, n0 + j * BM, cols, doc_end,
                                    T, qk_scale, s_qt, HQ, D, BM, True)
        if XSA:
            # the gradient into v through v̂ (these keys are the tokens whose own values the heads projected out):
            # dv̂ = -sum_heads (c dy + (dy . v̂) o) with o = y + c v̂; below eps v̂ = v / eps is linear in v,
            # above it the radial part vanishes: dv = (dv̂ - (dv̂ . v̂) v̂) / ||v||
            vs = v.to(tl.float32)
            norm = tl.sqrt(tl.sum(vs * vs, 1))
            inv = 1.0 / tl.maximum(norm, eps)
            v_hat = vs * inv[:, None]
            dv_hat = tl.zeros([BN, D], dtype=tl.float32)
            for i in tl.static_range(GROUP):
                h = g * GROUP + i
                offs = cols[:, None] * (HQ * D) + h * D + dims[None, :]
                dy = tl.load(DY + offs, mask=col_ok[:, None], other=0.0).to(tl.float32)
                y = tl.load(Y + offs, mask=col_ok[:, None], other=0.0).to(tl.float32)
                c = tl.load(C + h * T + cols, mask=col_ok, other=0.0)
                o = y + c[:, None] * v_hat
                dv_hat -= c[:, None] * dy + tl.sum(dy * v_hat, 1)[:, None] * o
            dv += tl.where((norm > eps)[:, None], dv_hat - tl.sum(dv_hat * v_hat, 1)[:, None] * v_hat,
                           dv_hat) * inv[:, None]
        offs = cols[:, None] * ((HQ // GROUP) * D) + g * D + dims[None, :]
        tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


def _configs(device: torch.device) -> tuple[KernelConfig, KernelConfig, KernelConfig]:
    if device.type != "cuda" or interpreting():
        return INTERPRET_CONFIG, INTERPRET_CONFIG, INTERPRET_CONFIG
    return FWD_CONFIG, DKDV_CONFIG, DQ_CONFIG


def doc_bounds(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(2, T) int32: each token's document start and end, found on the device without a host sync."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    idx = (torch.searchsorted(cu_seqlens, pos, right=True) - 1).clamp(0, cu_seqlens.numel() - 2)
    return torch.stack((cu_seqlens[idx], cu_seqlens[idx + 1])).to(torch.int32).contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_per_program(cfg: KernelConfig, group: int) -> int:
    """Query heads stacked in one program: a power of two dividing the group, at most cfg.heads."""
    return math.gcd(1 << (max(cfg.heads, 1).bit_length() - 1), group)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, xsa: bool,
             cfg: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: y (T, Hq, D), log2-sum-exp (Hq, T), and o . v̂ (Hq, T) when xsa."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    total, hq, d = q.shape
    group = hq // k.shape[1]
    cfg = cfg or _configs(q.device)[0]
    hp = _heads_per_program(cfg, group)
    y = q.new_empty(q.shape)
    lse = q.new_empty((hq, total), dtype=torch.float32)
    c = q.new_empty((hq, total) if xsa else (0,), dtype=torch.float32)
    if total:
        _fwd_kernel[(hq // hp, triton.cdiv(total, cfg.block_m))](
            q, k, v, y, lse, c, bounds, total, math.log2(math.e) / math.sqrt(d), XSA_EPS,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HQ=hq, GROUP=group, HP=hp, D=d, BM=cfg.block_m, BN=cfg.block_n, XSA=xsa,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y, lse, c


def _backward(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
              y: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, xsa: bool,
              cfgs: tuple[KernelConfig, KernelConfig] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dq kernel (which also writes do and delta), then the dk/dv kernel; gradients come back
    contiguous in the inputs' dtype."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    dy = dy.contiguous()
    total, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    dkdv_cfg, dq_cfg = cfgs or _configs(q.device)[1:]
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if not total:
        return dq, dk, dv
    delta = q.new_empty((hq, total), dtype=torch.float32)
    do = torch.empty_like(dy) if xsa else dy
    scale = 1.0 / math.sqrt(d)
    qk_scale = scale * math.log2(math.e)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    hp = _heads_per_program(dq_cfg, group)
    _bwd_dq_kernel[(hq // hp, triton.cdiv(total, dq_cfg.block_m))](
        q, k, v, dy, y, c, do, lse, delta, dq, bounds, total, qk_scale, scale, XSA_EPS, *strides,
        HQ=hq, GROUP=group, HP=hp, D=d, BM=dq_cfg.block_m, BN=dq_cfg.block_n, XSA=xsa,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages)
    _bwd_dkdv_kernel[(hkv, triton.cdiv(total, dkdv_cfg.block_n))](
        q, k, v, dy, y, c, do, lse, delta, dk, dv, bounds, total, qk_scale, scale, XSA_EPS, *strides,
        HQ=hq, GROUP=group, D=d, BM=dkdv_cfg.block_m, BN=dkdv_cfg.block_n, XSA=xsa,
        num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages)
    return dq, dk, dv


# Custom ops keep the Triton launches opaque to torch.compile (it traces the fake shapes) and carry autograd.
@torch.library.custom_op("pgolf::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                      xsa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, bounds, xsa)


@_attention_fwd_op.register_fake
def _(q, k, v, bounds, xsa):
    total, hq, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((hq, total), dtype=torch.float32),
            q.new_empty((hq, total) if xsa else (0,), dtype=torch.float32))


@torch.library.custom_op("pgolf::attention_bwd", mutates_args=())
def _attention_bwd_op(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                      y: torch.Tensor, lse: torch.Tensor, c: torch.Tensor,
                      xsa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, q, k, v, bounds, y, lse, c, xsa)


@_attention_bwd_op.register_fake
def _(dy, q, k, v, bounds, y, lse, c, xsa):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bounds, xsa = inputs
    y, lse, c = output
    ctx.mark_non_differentiable(lse, c)
    ctx.save_for_backward(q, k, v, bounds, y, lse, c)
    ctx.xsa = xsa


def _backward_rule(ctx, dy, _dlse, _dc):
    q, k, v, bounds, y, lse, c = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dy, q, k, v, bounds, y, lse, c, ctx.xsa)
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    xsa: bool = True) -> torch.Tensor:
    """The Triton path: flash attention over packed documents with XSA fused (needs Triton; CPU only when
    interpreting). max_seqlen is not needed: each block finds its keys through per-token document bounds."""
    _check_inputs(q, k, v, cu_seqlens)
    bounds = doc_bounds(cu_seqlens, q.shape[0])
    return _attention_fwd_op(q, k, v, bounds, xsa)[0]


# ---------------------------------------------------------------------------------------------------------------
# Unfused path: a library attention core, then XSA
# ---------------------------------------------------------------------------------------------------------------

def _import_flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


# Resolved once at import, not at the call: dynamo cannot trace an import inside a compiled model.
FLASH_ATTN_VARLEN = _import_flash_attn_varlen()


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    """torch.compile'd helpers, built once on first use (inside an outer compile they are inlined)."""
    if name == "xsa":
        return torch.compile(xsa_reference, dynamic=False)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sdpa_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int, backends: list | None = None,
               repeat_kv: bool = False) -> torch.Tensor:
    """Equal-length documents as a (rows, H, S, D) batch through SDPA (cuDNN first, then flash, efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    total, hq, d = q.shape
    seq = total // rows
    group = hq // k.shape[1]
    if repeat_kv:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    qb, kb, vb = (x.view(rows, seq, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    backends = backends or [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=not repeat_kv and group > 1)
    return o.transpose(1, 2).reshape(total, hq, d)


def flex_document_mask(cu_seqlens: torch.Tensor, total: int):
    """FlexAttention block mask for causal attention inside documents (build once per batch, reuse per layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.searchsorted(cu_seqlens, torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype),
                             right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(mask_mod, None, None, total, total, device=cu_seqlens.device, _compile=True)


def flex_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    o = _compiled("flex")(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                          block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


def attention_unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, xsa: bool = True) -> torch.Tensor:
    """Library core then a compiled XSA: flash_attn varlen if installed, else cuDNN SDPA when all documents have
    length max_seqlen (T == N * max_seqlen), else FlexAttention (which rebuilds its block mask every call)."""
    _check_inputs(q, k, v, cu_seqlens)
    total = q.shape[0]
    if FLASH_ATTN_VARLEN is not None:
        o = FLASH_ATTN_VARLEN(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    else:
        if not torch.compiler.is_compiling():
            say_once("no-flash-attn", "pgolf: flash_attn is not importable; unfused attention uses cuDNN SDPA for "
                                      "equal-length documents, FlexAttention otherwise")
        rows = cu_seqlens.numel() - 1
        if rows * max_seqlen == total:
            o = sdpa_dense(q, k, v, rows)
        else:
            o = flex_varlen(q, k, v, flex_document_mask(cu_seqlens, total))
    return _compiled("xsa")(o, v) if xsa else o
