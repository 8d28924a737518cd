"""Softcapped cross-entropy of the tied head: loss = CE(c*tanh(h W^T / c), targets).

h (N, dim), weight (V, dim), targets (N,) int64 with `ignore_index` entries skipped; softcap c <= 0 turns
the cap off. reduction "mean" (over non-ignored targets), "sum" or "none" (per-token NLL, 0 where ignored).

The Triton path (notes/cross_entropy.md has the measurements) never builds fp32 logits: rows are taken in chunks of
`CHUNK_ROWS`; per chunk cuBLAS writes bf16 logits z = h W^T, a Triton row kernel computes the softcap
(c*tanh(z/c) = 2c*sigmoid(2z/c) - c), logsumexp and NLL and, when gradients are wanted, overwrites z in place with
dL/dz; two more cuBLAS matmuls then give this chunk's dh and its share of dW. With "mean"/"sum" the gradients are
computed during the forward (the loss is a scalar, so the backward only scales them); "none" (evaluation) computes
the NLL alone and, if a gradient is asked for anyway, recomputes the logits in the backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import compute_dtype, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path needs no Triton
    triton = None

IGNORE_INDEX = -100
# Rows per chunk: bounds the bf16 logits buffer to CHUNK_ROWS x V (32768 x 8192 x 2 bytes = 512 MiB); 0 = one chunk.
# 32768 was the fastest chunking on H100 that keeps the peak under half of torch.compile's (notes/cross_entropy.md).
CHUNK_ROWS = 32768
_REDUCTIONS = ("mean", "sum", "none")


def softcap(z: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(z / cap) if cap > 0 else z


def softcap_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 30.0,
                                    reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    logits = softcap(F.linear(h, weight).float(), cap)
    return F.cross_entropy(logits, targets, reduction=reduction, ignore_index=ignore_index)


def softcap_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float = 30.0,
                          reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The head + loss the model calls: Triton on CUDA, the reference elsewhere."""
    if use_triton(h):
        return _softcap_ce_triton(h, weight, targets, cap, reduction, ignore_index)
    return softcap_cross_entropy_reference(h, weight, targets, cap, reduction, ignore_index)


def _softcap_ce_triton(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str,
                       ignore_index: int) -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"pgolf/kernels/cross_entropy.py: reduction must be one of {_REDUCTIONS}, not {reduction!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"pgolf/kernels/cross_entropy.py: h {tuple(h.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} do not fit (N, dim), (V, dim), (N,)")
    h = h.to(compute_dtype(h)).contiguous()
    weight = weight.to(h.dtype).contiguous()
    targets = targets.contiguous()
    cap, chunk = float(cap), int(CHUNK_ROWS)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction != "none" and wants_grad:
        loss, _, _ = torch.ops.pgolf.softcap_ce_fused(h, weight, targets, cap, ignore_index, reduction == "mean",
                                                      chunk)
        return loss
    nll = torch.ops.pgolf.softcap_ce_rows(h, weight, targets, cap, ignore_index, chunk)
    if reduction == "none":
        return nll
    total = nll.sum()
    return total / (targets != ignore_index).sum() if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------- Triton kernel

if triton is not None:

    @triton.jit
    def _softcap(z, cap, two_log2e_over_cap, HAS_CAP: tl.constexpr):
        """(c, s): c = cap*tanh(z/cap) = 2cap*s - cap with s = sigmoid(2z/cap) = 1/(1 + 2^(-z*2log2(e)/cap)).

        Finite for any z, infinities included (2^inf = inf gives s = 0, c = -cap), and dc/dz = 4s(1-s) has no
        cancellation. Without the cap: (z, z), s unused."""
        if HAS_CAP:
            s = 1.0 / (1.0 + tl.exp2(-z * two_log2e_over_cap))
            c = 2.0 * cap * s - cap
        else:
            s = z
            c = z
        return c, s

    @triton.jit
    def _softcap_ce_row_kernel(z_ptr, stride_z, tgt_ptr, nll_ptr, scale_ptr, V, cap, two_log2e_over_cap,
                               ignore_index, HAS_CAP: tl.constexpr, FIXED_SHIFT: tl.constexpr,
                               WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
                               ONE_BLOCK: tl.constexpr):
        """One row of logits z (any float dtype): NLL of the softcapped row and, with WRITE_GRAD, dNLL/dz * scale
        written over z.

        FIXED_SHIFT (cap <= 40): every softcapped logit is <= cap, so exp(c - cap) needs no row maximum and cannot
        underflow to an all-zero sum (exp(-2*40) is a normal float). ONE_BLOCK: the whole row lives in registers
        (one read, one write); otherwise two sweeps over the row.
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        tgt = tl.load(tgt_ptr + row).to(tl.int32)
        valid = tgt != ignore_index
        # the target's logit, read before this program overwrites the row (out-of-range targets are clamped)
        z_t = tl.load(z_row + tl.minimum(tl.maximum(tl.where(valid, tgt, 0), 0), V - 1)).to(tl.float32)
        c_t, _ = _softcap(z_t, cap, two_log2e_over_cap, HAS_CAP)
        offs = tl.arange(0, BLOCK_V)
        if ONE_BLOCK:
            mask = offs < V
            c, s = _softcap(tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32), cap, two_log2e_over_cap,
                            HAS_CAP)
            if FIXED_SHIFT:
                m = cap
            else:
                m = tl.max(tl.where(mask, c, -float("inf")), axis=0)
            e = tl.where(mask, tl.exp2((c - m) * LOG2E), 0.0)
            total = tl.sum(e, axis=0)
        else:
            if FIXED_SHIFT:
                m = cap
                total = 0.0
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    c, _ = _softcap(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), cap,
                                    two_log2e_over_cap, HAS_CAP)
                    total += tl.sum(tl.where(cols < V, tl.exp2((c - m) * LOG2E), 0.0), axis=0)
            else:
                m = -float("inf")
                total = 0.0
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    c, _ = _softcap(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), cap,
                                    two_log2e_over_cap, HAS_CAP)
                    c = tl.where(cols < V, c, -float("inf"))
                    m_new = tl.maximum(m, tl.max(c, axis=0))
                    total = total * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((c - m_new) * LOG2E), axis=0)
                    m = m_new
        lse = m + tl.log(total)
        tl.store(nll_ptr + row, tl.where(valid, lse - c_t, 0.0))
        if WRITE_GRAD:
            if ROW_SCALE:
                scale = tl.load(scale_ptr + row).to(tl.float32)
            else:
                scale = tl.load(scale_ptr).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)
            if ONE_BLOCK:
                g = e * (scale / total) - tl.where(offs == tgt, scale, 0.0)
                if HAS_CAP:
                    g = g * (4.0 * s * (1.0 - s))
                tl.store(z_row + offs, g.to(z_ptr.dtype.element_ty), mask=mask)
            else:
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    c, s = _softcap(tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32), cap,
                                    two_log2e_over_cap, HAS_CAP)
                    g = (tl.exp2((c - lse) * LOG2E) - tl.where(cols == tgt, 1.0, 0.0)) * scale
                    if HAS_CAP:
                        g = g * (4.0 * s * (1.0 - s))
                    tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=cols < V)


MAX_ONE_BLOCK = 16384  # rows up to this many logits are held in registers whole
LOOP_BLOCK = 4096  # logits per step for longer rows
ROW_WARPS = 8  # warps per row program (measured on H100 at V = 8192: notes/cross_entropy.md)
FIXED_SHIFT_MAX_CAP = 40.0


def _row_launch_config(V: int) -> tuple[int, bool, int]:
    """(BLOCK_V, ONE_BLOCK, num_warps) for a row of V logits."""
    block = triton.next_power_of_2(V)
    if block <= MAX_ONE_BLOCK:
        return block, True, max(1, min(ROW_WARPS, block // 256))
    return LOOP_BLOCK, False, ROW_WARPS


def softcap_ce_rows_inplace(z: torch.Tensor, targets: torch.Tensor, cap: float, ignore_index: int,
                            scale: torch.Tensor | None = None, nll: torch.Tensor | None = None,
                            num_warps: int | None = None) -> torch.Tensor:
    """Per-row NLL of softcapped logits z (rows, V); with `scale` (1 element, or one per row) z is overwritten by
    dNLL/dz * scale (0 on ignored rows). Returns the fp32 NLL (0 on ignored rows). num_warps: tuning override.
    Targets outside [0, V) other than ignore_index give undefined values (F.cross_entropy raises)."""
    if z.dim() != 2 or z.stride(1) != 1 or targets.shape != z.shape[:1]:
        raise ValueError(f"pgolf/kernels/cross_entropy.py: logits {tuple(z.shape)} (row-contiguous) and targets "
                         f"{tuple(targets.shape)} do not fit (rows, V), (rows,)")
    rows, V = z.shape
    nll = torch.empty(rows, device=z.device, dtype=torch.float32) if nll is None else nll
    if rows == 0:
        return nll
    block, one_block, warps = _row_launch_config(V)
    has_cap = cap > 0
    write_grad = scale is not None
    row_scale = write_grad and scale.numel() == rows and scale.numel() != 1
    _softcap_ce_row_kernel[(rows,)](z, z.stride(0), targets, nll, scale if write_grad else nll, V, cap,
                                    2.0 * math.log2(math.e) / cap if has_cap else 0.0, ignore_index,
                                    HAS_CAP=has_cap, FIXED_SHIFT=has_cap and cap <= FIXED_SHIFT_MAX_CAP,
                                    WRITE_GRAD=write_grad, ROW_SCALE=row_scale, BLOCK_V=block,
                                    ONE_BLOCK=one_block, num_warps=num_warps or warps)
    return nll


def _chunks(n: int, chunk_rows: int) -> list[tuple[int, int]]:
    step = n if chunk_rows <= 0 else max(1, chunk_rows)
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _head_pass(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, ignore_index: int,
               chunk_rows: int, scale: torch.Tensor | None, want_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """NLL per row and, with want_grad, (dh, dW) of sum_i scale_i * NLL_i, chunk by chunk over the rows."""
    n, V = h.shape[0], weight.shape[0]
    nll = torch.empty(n, device=h.device, dtype=torch.float32)
    dh = torch.empty_like(h) if want_grad else None
    chunks = _chunks(n, chunk_rows)
    # dW is summed over chunks in fp32 unless one matmul produces it whole.
    dw = torch.zeros_like(weight, dtype=torch.float32) if want_grad and len(chunks) > 1 else None
    buf = torch.empty(max((b - a for a, b in chunks), default=0), V, device=h.device, dtype=h.dtype)
    for start, end in chunks:
        z = buf[: end - start]
        torch.mm(h[start:end], weight.t(), out=z)
        row_scale = None if not want_grad else scale if scale.numel() == 1 else scale[start:end]
        softcap_ce_rows_inplace(z, targets[start:end], cap, ignore_index, row_scale, nll[start:end])
        if want_grad:
            torch.mm(z, weight, out=dh[start:end])
            if dw is None:
                dw = torch.mm(z.t(), h[start:end])
            elif dw.dtype == z.dtype:
                dw.addmm_(z.t(), h[start:end])
            else:
                dw.add_(torch.mm(z.t(), h[start:end]))
    if want_grad:
        dw = weight.new_zeros(weight.shape) if dw is None else dw.to(weight.dtype)
    return nll, dh, dw


# ------------------------------------------------------------------------------------- custom ops and autograd

@torch.library.custom_op("pgolf::softcap_ce_fused", mutates_args=())
def _ce_fused(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, ignore_index: int,
              mean: bool, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dh, dloss/dW) for reduction mean (mean=True) or sum, gradients made in the same pass."""
    count = (targets != ignore_index).sum().to(torch.float32)
    scale = (1.0 / count).reshape(1) if mean else torch.ones(1, device=h.device, dtype=torch.float32)
    nll, dh, dw = _head_pass(h, weight, targets, cap, ignore_index, chunk_rows, scale, True)
    return nll.sum() * scale[0], dh, dw


@_ce_fused.register_fake
def _(h, weight, targets, cap, ignore_index, mean, chunk_rows):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


def _fused_setup_context(ctx, inputs, output) -> None:
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, _grad_dh, _grad_dw):
    dh, dw = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None, None
    g = grad_loss.to(torch.float32)
    dh = (dh * g).to(dh.dtype) if ctx.needs_input_grad[0] else None
    dw = (dw * g).to(dw.dtype) if ctx.needs_input_grad[1] else None
    return dh, dw, None, None, None, None, None


_ce_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("pgolf::softcap_ce_rows", mutates_args=())
def _ce_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, ignore_index: int,
             chunk_rows: int) -> torch.Tensor:
    """Per-token NLL (fp32, 0 where ignored): the evaluation path, no gradient work in the forward."""
    return _head_pass(h, weight, targets, cap, ignore_index, chunk_rows, None, False)[0]


@_ce_rows.register_fake
def _(h, weight, targets, cap, ignore_index, chunk_rows):
    return h.new_empty(h.shape[0], dtype=torch.float32)


@torch.library.custom_op("pgolf::softcap_ce_rows_backward", mutates_args=())
def _ce_rows_backward(grad_nll: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      cap: float, ignore_index: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dW) of sum_i grad_nll_i * NLL_i, the logits recomputed chunk by chunk."""
    scale = grad_nll.to(torch.float32).contiguous()
    _, dh, dw = _head_pass(h, weight, targets, cap, ignore_index, chunk_rows, scale, True)
    return dh, dw


@_ce_rows_backward.register_fake
def _(grad_nll, h, weight, targets, cap, ignore_index, chunk_rows):
    return torch.empty_like(h), torch.empty_like(weight)


def _rows_setup_context(ctx, inputs, output) -> None:
    h, weight, targets, cap, ignore_index, chunk_rows = inputs
    ctx.save_for_backward(h, weight, targets)
    ctx.args = (cap, ignore_index, chunk_rows)


def _rows_backward(ctx, grad_nll):
    h, weight, targets = ctx.saved_tensors
    dh, dw = torch.ops.pgolf.softcap_ce_rows_backward(grad_nll, h, weight, targets, *ctx.args)
    return dh, dw, None, None, None, None


_ce_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)
