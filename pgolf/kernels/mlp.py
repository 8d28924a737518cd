"""Fused MLP: out = down(act(up(x))) with act = LeakyReLU(slope)^2 (slope 0.5) or ReLU^2 (slope 0).

Weights use nn.Linear's layout: w_up (hidden, dim), w_down (dim, hidden).

The Triton path (notes/mlp.md has the byte counts and timings):
- forward: one Triton matmul computes x @ w_up^T and, in its epilogue, act = leaky(pre)^2 (stored in x's dtype) and
  the sign of pre packed 8 per byte; out = act @ w_down^T stays a cuBLAS matmul.
- saved for backward: act and the sign bits (2.125 bytes per hidden element; act alone for ReLU^2), because
  act'(pre) = 2*sqrt(act) where pre > 0 and -2*|slope|*sqrt(act) where not, so pre itself need not be kept.
- backward: one Triton matmul computes dout @ w_down and multiplies by act'(pre) in its epilogue (d_pre); the three
  weight/input gradient matmuls (dout^T act, d_pre^T x, d_pre w_up) are cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import interpreting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path needs no Triton
    triton = None


def leaky_relu_square(h: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """where(h > 0, h, slope*h)^2; slope 0 gives ReLU^2."""
    return torch.square(F.leaky_relu(h, negative_slope))


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    return F.linear(leaky_relu_square(F.linear(x, w_up), negative_slope), w_down)


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """The MLP the model calls: Triton on CUDA, the reference elsewhere. x: (..., dim)."""
    if use_triton(x):
        return _fused_mlp_triton(x, w_up, w_down, negative_slope)
    return mlp_reference(x, w_up, w_down, negative_slope)


def _check_shapes(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> None:
    if w_up.dim() != 2 or w_down.dim() != 2:
        raise ValueError(f"pgolf/kernels/mlp.py: weights must be 2-D, got w_up {tuple(w_up.shape)}, "
                         f"w_down {tuple(w_down.shape)}")
    hidden, dim = w_up.shape
    if x.shape[-1] != dim or tuple(w_down.shape) != (dim, hidden):
        raise ValueError(f"pgolf/kernels/mlp.py: x (..., {x.shape[-1]}), w_up {tuple(w_up.shape)} and w_down "
                         f"{tuple(w_down.shape)} do not fit (..., dim), (hidden, dim), (dim, hidden)")


def _fused_mlp_triton(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float) -> torch.Tensor:
    _check_shapes(x, w_up, w_down)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_up = w_up.to(x.dtype).contiguous()
    w_down = w_down.to(x.dtype).contiguous()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_up.requires_grad or w_down.requires_grad)
    out, _, _ = torch.ops.pgolf.mlp_forward(x2, w_up, w_down, float(negative_slope), needs_grad)
    return out.reshape(*lead, w_down.shape[0])


SIGN_FORMAT = 1  # how the forward saves sign(pre) for LeakyReLU: see _mlp_matmul_kernel


def sign_bytes(hidden: int) -> int:
    """Bytes per token of the packed sign of pre (bit j of byte b is column 8*b + j)."""
    return (hidden + 7) // 8


# ----------------------------------------------------------------------------------------------- Triton kernels

def _matmul_configs() -> list:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # 128x256 and 256x128 tiles: one CTA per SM; 128x128 / 64x128 with 3-4 stages: two CTAs per SM, so that one's
    # epilogue (K is only 512: 8 steps of main loop) overlaps the other's main loop.
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3),
              (128, 256, 64, 8, 2), (64, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


if triton is not None:

    @triton.autotune(configs=_matmul_configs(), key=["N", "K", "EPILOGUE", "SIGN_FORMAT"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                        "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
    @triton.jit
    def _mlp_matmul_kernel(a_ptr, b_ptr, c_ptr, act_ptr, sign_ptr, M, N, K,
                           stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_sm, abs_slope,
                           EPILOGUE: tl.constexpr, SIGN_FORMAT: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """acc = A (M,K) @ B (K,N) in fp32, then one of two epilogues.

        EPILOGUE 0 (forward): c = leaky(acc)^2 and the signs (acc > 0) at sign_ptr.
        EPILOGUE 1 (backward): c = acc * act'(pre), act'(pre) rebuilt from act (act_ptr) and the signs.
        SIGN_FORMAT: 0 none (ReLU^2), 1 bits packed 8 per byte (packed by reshape+sum), 2 the same bits packed by
        three pairwise splits and read back by byte gathers, 3 one byte per element.
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_size
        pid_n = (pid % width) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows/columns past the edge are wrapped onto valid ones for the loads (no masks in the main loop) and
        # dropped at the store; whole column blocks keep their contiguity (vector loads of an N-major B).
        rows = (offs_m % M).to(tl.int64)
        if EVEN_N:
            cols = offs_n
        else:
            cols = offs_n % N
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        out_rows = offs_m.to(tl.int64)
        row_ok = offs_m < M
        col_ok = offs_n < N
        c_ptrs = c_ptr + out_rows[:, None] * stride_cm + offs_n[None, :]
        c_mask = row_ok[:, None] & col_ok[None, :]
        offs_byte = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        byte_ptrs = sign_ptr + out_rows[:, None] * stride_sm + offs_byte[None, :]
        byte_mask = row_ok[:, None] & (offs_byte < (N + 7) // 8)[None, :]
        elem_ptrs = sign_ptr + out_rows[:, None] * stride_sm + offs_n[None, :]
        if EPILOGUE == 0:
            pos = acc > 0
            y = tl.where(pos, acc, acc * abs_slope)
            tl.store(c_ptrs, (y * y).to(c_ptr.dtype.element_ty), mask=c_mask)
            bits = (pos & col_ok[None, :]).to(tl.uint8)  # pad bits past the last column stay 0
            if SIGN_FORMAT == 1:
                shifts = tl.arange(0, 8).to(tl.uint8)
                grouped = tl.reshape(bits, (BLOCK_M, BLOCK_N // 8, 8)) << shifts[None, None, :]
                tl.store(byte_ptrs, tl.sum(grouped, axis=2).to(tl.uint8), mask=byte_mask)
            elif SIGN_FORMAT == 2:
                lo, hi = tl.split(tl.reshape(bits, (BLOCK_M, BLOCK_N // 2, 2)))
                pairs = lo | (hi << 1)
                lo, hi = tl.split(tl.reshape(pairs, (BLOCK_M, BLOCK_N // 4, 2)))
                quads = lo | (hi << 2)
                lo, hi = tl.split(tl.reshape(quads, (BLOCK_M, BLOCK_N // 8, 2)))
                tl.store(byte_ptrs, lo | (hi << 4), mask=byte_mask)
            elif SIGN_FORMAT == 3:
                tl.store(elem_ptrs, bits, mask=c_mask)
        else:
            act = tl.load(act_ptr + out_rows[:, None] * stride_cm + offs_n[None, :], mask=c_mask, other=0.0)
            slope_grad = 2.0 * tl.sqrt(act.to(tl.float32))
            if SIGN_FORMAT != 0:
                if SIGN_FORMAT == 1:
                    packed = tl.load(byte_ptrs, mask=byte_mask, other=0)
                    shifts = tl.arange(0, 8).to(tl.uint8)
                    pos = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_M, BLOCK_N)) != 0
                elif SIGN_FORMAT == 2:
                    gathered = tl.load(sign_ptr + out_rows[:, None] * stride_sm + (offs_n // 8)[None, :],
                                       mask=c_mask, other=0)
                    pos = ((gathered >> (offs_n % 8).to(tl.uint8)[None, :]) & 1) != 0
                else:
                    pos = tl.load(elem_ptrs, mask=c_mask, other=0) != 0
                slope_grad = tl.where(pos, slope_grad, -abs_slope * slope_grad)
            tl.store(c_ptrs, (acc * slope_grad).to(c_ptr.dtype.element_ty), mask=c_mask)


def _launch(a: torch.Tensor, b: torch.Tensor, trans_b: bool, c: torch.Tensor, act: torch.Tensor | None,
            signs: torch.Tensor | None, abs_slope: float, epilogue: int, sign_format: int) -> None:
    """c (M,N) <- epilogue(a (M,K) @ B), B = b^T when trans_b (b stored (N,K)) else b (stored (K,N))."""
    M, K = a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    stride_bk, stride_bn = (b.stride(1), b.stride(0)) if trans_b else (b.stride(0), b.stride(1))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    # Unused pointer arguments get `c` as a stand-in: the kernel never dereferences them.
    _mlp_matmul_kernel[grid](a, b, c, c if act is None else act, c if sign_format == 0 else signs, M, N, K,
                             a.stride(0), a.stride(1), stride_bk, stride_bn, c.stride(0),
                             signs.stride(0) if sign_format else 0, abs_slope,
                             EPILOGUE=epilogue, SIGN_FORMAT=sign_format, IEEE=a.dtype == torch.float32)


def _sign_format(negative_slope: float, save_signs: bool = True) -> int:
    return SIGN_FORMAT if save_signs and negative_slope != 0 else 0


def _sign_shape(tokens: int, hidden: int, sign_format: int) -> tuple[int, int]:
    if sign_format == 0:
        return (0, 0)
    return (tokens, hidden if sign_format == 3 else sign_bytes(hidden))


def up_act(x: torch.Tensor, w_up: torch.Tensor, negative_slope: float, with_signs: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """act = leaky(x @ w_up^T)^2 and the saved signs of the pre-activation (empty for ReLU^2 or no signs)."""
    M, hidden = x.shape[0], w_up.shape[0]
    act = torch.empty(M, hidden, device=x.device, dtype=x.dtype)
    fmt = _sign_format(negative_slope, with_signs)
    signs = torch.empty(_sign_shape(M, hidden, fmt), device=x.device, dtype=torch.uint8)
    _launch(x, w_up, True, act, None, signs, abs(negative_slope), 0, fmt)
    return act, signs


def down_grad_act(dout: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor, signs: torch.Tensor,
                  negative_slope: float) -> torch.Tensor:
    """d_pre = (dout @ w_down) * act'(pre), act'(pre) rebuilt from act and the saved signs."""
    d_pre = torch.empty_like(act)
    fmt = _sign_format(negative_slope)
    if tuple(signs.shape) != _sign_shape(*act.shape, fmt):
        raise ValueError("pgolf/kernels/mlp.py: the signs of a LeakyReLU MLP were not saved (forward ran without "
                         "grad?) or were saved in another SIGN_FORMAT")
    _launch(dout, w_down, False, d_pre, act, signs, abs(negative_slope), 1, fmt)
    return d_pre


# ------------------------------------------------------------------------------------- custom ops and autograd

@torch.library.custom_op("pgolf::mlp_forward", mutates_args=())
def _mlp_forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float,
                 save_signs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, act, signs) for 2-D contiguous x; act and signs are what the backward reads."""
    act, signs = up_act(x, w_up, negative_slope, save_signs)
    return torch.mm(act, w_down.t()), act, signs


@_mlp_forward.register_fake
def _(x, w_up, w_down, negative_slope, save_signs):
    M, hidden = x.shape[0], w_up.shape[0]
    signs = x.new_empty(_sign_shape(M, hidden, _sign_format(negative_slope, save_signs)), dtype=torch.uint8)
    return x.new_empty(M, w_down.shape[0]), x.new_empty(M, hidden), signs


@torch.library.custom_op("pgolf::mlp_backward", mutates_args=())
def _mlp_backward(dout: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor,
                  signs: torch.Tensor, negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_up, dw_down)."""
    dout = dout.contiguous()
    d_pre = down_grad_act(dout, w_down, act, signs, negative_slope)
    return torch.mm(d_pre, w_up), torch.mm(d_pre.t(), x), torch.mm(dout.t(), act)


@_mlp_backward.register_fake
def _(dout, x, w_up, w_down, act, signs, negative_slope):
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output) -> None:
    x, w_up, w_down, negative_slope, _ = inputs
    _, act, signs = output
    ctx.save_for_backward(x, w_up, w_down, act, signs)
    ctx.negative_slope = negative_slope
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _d_act, _d_signs):
    x, w_up, w_down, act, signs = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dx, dw_up, dw_down = torch.ops.pgolf.mlp_backward(dout, x, w_up, w_down, act, signs, ctx.negative_slope)
    return dx, dw_up, dw_down, None, None


_mlp_forward.register_autograd(_backward, setup_context=_setup_context)
