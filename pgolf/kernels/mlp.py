"""Fused MLP: out = down(act(up(x))) with act = LeakyReLU(slope)^2 (slope 0.5) or ReLU^2 (slope 0).

Weights use nn.Linear's layout: w_up (hidden, dim), w_down (dim, hidden).

The Triton path (notes/mlp.md has the byte counts and timings):
- forward: one Triton matmul computes x @ w_up^T and, in its epilogue, act = leaky(pre)^2, stored in x's dtype;
  out = act @ w_down^T stays a cuBLAS matmul.
- saved for backward: act alone, 2 bytes per hidden element. act'(pre) = 2*sqrt(act) where pre > 0 and
  -2*|slope|*sqrt(act) where not, so only sign(pre) is missing; with a LeakyReLU (slope != 0) and a gradient
  wanted, the forward stores whichever of the two representable values around act has that sign as its last
  mantissa bit (at most one unit in the last place from act, unbiased); in bf16 that is a few integer operations on
  the fp32 bit pattern. cuBLAS reads that tensor as act; the backward reads the sign back from it.
- backward: one Triton matmul computes dout @ w_down and multiplies by act'(pre) in its epilogue (d_pre); the three
  weight/input gradient matmuls (dout^T act, d_pre^T x, d_pre w_up) are cuBLAS.
- the Triton matmuls are persistent kernels loading through TMA descriptors where the tensors allow it (16-bit
  dtypes, 16-byte aligned rows), and a plain autotuned pointer kernel elsewhere (odd widths, fp32).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pgolf.kernels.dispatch import compute_dtype, interpreting, mode, say_once, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path needs no Triton
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton before 3.3: the pointer kernel only
    TensorDescriptor = None


def leaky_relu_square(h: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """where(h > 0, h, slope*h)^2; slope 0 gives ReLU^2."""
    return torch.square(F.leaky_relu(h, negative_slope))


def mlp_reference(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    return F.linear(leaky_relu_square(F.linear(x, w_up), negative_slope), w_down)


TRITON_MIN_TOKENS = 65_536
"""Below this many tokens the Triton MLP measured slower than cuBLAS with the activation around it (H100,
2026-11-24, fwd+bwd: 49,152 tokens 2.14 ms against 1.83 eager and 1.56 compiled; 16,384 tokens 1.55 against 0.90);
at the record's 98,304 it is on par with torch.compile and 1.45x faster than eager."""

TRITON_SLOPES = (0.0, 0.5)
"""Activations `auto` hands to the kernel (at >= TRITON_MIN_TOKENS). H100, fwd+bwd at 98,304 tokens: ReLU^2 2.18 ms
against 2.49 compiled; LeakyReLU(0.5)^2 2.42 against 2.51 compiled since the sign is encoded on the fp32 bit pattern
(it was 2.61 against 2.54 before, 2026-11-25); the whole record step 107.1 ms with the kernel against 107.6 with the
compiled reference (one run each, inside the run-to-run spread of about 0.5%)."""


def fused_mlp(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float = 0.5) -> torch.Tensor:
    """The MLP the model calls: Triton on CUDA where it measured faster (see TRITON_MIN_TOKENS and TRITON_SLOPES),
    the reference elsewhere."""
    if use_triton(x) and (mode() == "triton" or (x.numel() >= TRITON_MIN_TOKENS * x.shape[-1]
                                                  and negative_slope in TRITON_SLOPES)):
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
    x = x.to(compute_dtype(x))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w_up = w_up.to(x.dtype).contiguous()
    w_down = w_down.to(x.dtype).contiguous()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_up.requires_grad or w_down.requires_grad)
    out, _ = torch.ops.pgolf.mlp_forward(x2, w_up, w_down, float(negative_slope), needs_grad)
    return out.reshape(*lead, w_down.shape[0])


# ----------------------------------------------------------------------------------------------- Triton kernels

_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _pointer_configs() -> list:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


if triton is not None:

    @triton.jit
    def _tile_position(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of a tile index, GROUP_M row blocks at a time (L2 reuse of B)."""
        num_m = tl.cdiv(M, BLOCK_M)
        width = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = (tile // width) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % width) % group_size, (tile % width) // group_size

    @triton.jit
    def _act_epilogue(acc, abs_slope, ENCODE_SIGN: tl.constexpr, OUT: tl.constexpr, BITS: tl.constexpr):
        """act = leaky(acc)^2 in dtype OUT; with ENCODE_SIGN, of the two OUT values around the exact act (one of
        them is the rounded value) the one whose last mantissa bit is (acc > 0)."""
        pos = acc > 0
        y = tl.where(pos, acc, acc * abs_slope)
        exact = y * y
        if ENCODE_SIGN:
            if OUT == tl.bfloat16:
                # bf16 is the top half of fp32: exact's two bf16 neighbours are u (truncated) and u + 1; take the
                # one whose last bit is the sign. Capped below inf (u + 1 of inf is a NaN); a NaN stays a NaN.
                u = exact.to(tl.int32, bitcast=True) >> 16
                u = tl.where(exact == exact, tl.minimum(u, 0x7F7E), u)
                u = u + ((u ^ pos.to(tl.int32)) & 1)
                act = u.to(tl.int16).to(OUT, bitcast=True)
            else:  # fp16/fp32: round, then step to the neighbour towards exact where the last bit is wrong
                bits = exact.to(OUT).to(BITS, bitcast=True)
                up = (exact > bits.to(OUT, bitcast=True).to(tl.float32)) | (bits == 0)
                fixed = tl.where(up, bits + 1, bits - 1).to(BITS)
                act = tl.where((bits & 1) != pos.to(BITS), fixed, bits).to(OUT, bitcast=True)
        else:
            act = exact.to(OUT)
        return act

    @triton.jit
    def _grad_epilogue(acc, act, abs_slope, ENCODE_SIGN: tl.constexpr, BITS: tl.constexpr):
        """d_pre = acc * act'(pre): 2*sqrt(act) where pre > 0, -2*|slope|*sqrt(act) where not."""
        slope_grad = 2.0 * tl.sqrt(act.to(tl.float32))
        if ENCODE_SIGN:
            pos = (act.to(BITS, bitcast=True) & 1) != 0
            slope_grad = tl.where(pos, slope_grad, -abs_slope * slope_grad)
        return acc * slope_grad

    @triton.jit
    def _mlp_tma_kernel(a_desc, b_desc, c_desc, act_desc, M, N, K, abs_slope, EPILOGUE: tl.constexpr,
                        ENCODE_SIGN: tl.constexpr, TRANS_B: tl.constexpr, OUT: tl.constexpr, BITS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr):
        """Persistent C = epilogue(A @ B) with TMA loads/stores (edges zero-filled / clipped by the copy engine).

        B is b_desc (N, K) transposed when TRANS_B, else b_desc (K, N). EPILOGUE 0: C = act(acc);
        EPILOGUE 1: C = acc * act'(pre) with act read through act_desc.
        """
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS):
            pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            om = pid_m * BLOCK_M
            on = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = a_desc.load([om, k])
                if TRANS_B:
                    b = b_desc.load([on, k]).T
                else:
                    b = b_desc.load([k, on])
                acc = tl.dot(a, b, acc)
            if EPILOGUE == 0:
                c_desc.store([om, on], _act_epilogue(acc, abs_slope, ENCODE_SIGN, OUT, BITS))
            else:
                act = act_desc.load([om, on])
                c_desc.store([om, on], _grad_epilogue(acc, act, abs_slope, ENCODE_SIGN, BITS).to(OUT))

    @triton.autotune(configs=_pointer_configs(), key=["N", "K", "EPILOGUE", "ENCODE_SIGN"])
    @triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                        "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})
    @triton.jit
    def _mlp_pointer_kernel(a_ptr, b_ptr, c_ptr, act_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                            stride_cm, abs_slope, EPILOGUE: tl.constexpr, ENCODE_SIGN: tl.constexpr,
                            OUT: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """The same C = epilogue(A @ B), one tile per program, for any strides and dtypes (B is (K, N) by strides)."""
        pid_m, pid_n = _tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
        out_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if EPILOGUE == 0:
            tl.store(c_ptr + out_offs, _act_epilogue(acc, abs_slope, ENCODE_SIGN, OUT, BITS), mask=mask)
        else:
            act = tl.load(act_ptr + out_offs, mask=mask, other=0.0)
            tl.store(c_ptr + out_offs, _grad_epilogue(acc, act, abs_slope, ENCODE_SIGN, BITS).to(OUT), mask=mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides; the fast configs assume 16-bit elements."""
    return TensorDescriptor is not None and _has_tma(tensors[0].device) and all(
        t.element_size() == 2 and t.stride(1) == 1 and t.stride(0) * 2 % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors)


def _launch(a: torch.Tensor, b: torch.Tensor, trans_b: bool, c: torch.Tensor, act: torch.Tensor | None,
            abs_slope: float, epilogue: int, encode_sign: bool) -> None:
    """c (M,N) <- epilogue(a (M,K) @ B), B = b^T when trans_b (b stored (N,K)) else b (stored (K,N))."""
    M, K = a.shape
    N = c.shape[1]
    dtypes = dict(OUT=getattr(tl, _TL_DTYPES[c.dtype]), BITS=tl.int16 if c.element_size() == 2 else tl.int32)
    act = c if act is None else act  # a stand-in the forward epilogue never reads
    if _tma_ready(a, b, c, act):
        if c.is_cuda:
            # Host-side TMA descriptors are encoded through the driver API, which needs a current CUDA context;
            # autograd's device thread can lack one ("invalid device context", seen on H100 in a benchmark whose
            # first backward op was this kernel). cuBLAS's handle getter makes the primary context current.
            torch.cuda.current_blas_handle()
        bm, bn, bk, warps, stages = (32, 32, 16, 4, 1) if interpreting() else (128, 256, 64, 8, 3)
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        progs = max(1, min(tiles, 4 if interpreting() else _sm_count(c.device)))
        desc = TensorDescriptor.from_tensor
        try:
            _mlp_tma_kernel[(progs,)](desc(a, [bm, bk]), desc(b, [bn, bk] if trans_b else [bk, bn]),
                                      desc(c, [bm, bn]), desc(act, [bm, bn]), M, N, K, abs_slope,
                                      EPILOGUE=epilogue, ENCODE_SIGN=encode_sign, TRANS_B=trans_b, BLOCK_M=bm,
                                      BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_PROGS=progs, num_warps=warps,
                                      num_stages=stages, **dtypes)
            return
        except RuntimeError as err:  # descriptor creation failed on the host, before any launch: fall back
            if "tensor map" not in str(err):
                raise
            say_once("mlp-tma", f"pgolf/kernels/mlp.py: TMA descriptors unavailable ({err}); using the pointer kernel")
    stride_bk, stride_bn = (b.stride(1), b.stride(0)) if trans_b else (b.stride(0), b.stride(1))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _mlp_pointer_kernel[grid](a, b, c, act, M, N, K, a.stride(0), a.stride(1), stride_bk, stride_bn, c.stride(0),
                              abs_slope, EPILOGUE=epilogue, ENCODE_SIGN=encode_sign,
                              IEEE=a.dtype == torch.float32, **dtypes)


def up_act(x: torch.Tensor, w_up: torch.Tensor, negative_slope: float, encode_sign: bool = True) -> torch.Tensor:
    """act = leaky(x @ w_up^T)^2 for 2-D x; with encode_sign (and slope != 0) sign(pre) rides in the last bit."""
    act = torch.empty(x.shape[0], w_up.shape[0], device=x.device, dtype=x.dtype)
    _launch(x, w_up, True, act, None, abs(negative_slope), 0, encode_sign and negative_slope != 0)
    return act


def down_grad_act(dout: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """d_pre = (dout @ w_down) * act'(pre), act from up_act(..., encode_sign=True)."""
    d_pre = torch.empty_like(act)
    _launch(dout, w_down, False, d_pre, act, abs(negative_slope), 1, negative_slope != 0)
    return d_pre


# ------------------------------------------------------------------------------------- custom ops and autograd

@torch.library.custom_op("pgolf::mlp_forward", mutates_args=())
def _mlp_forward(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, negative_slope: float,
                 for_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, act) for 2-D contiguous x; act (sign-carrying when for_backward) is what the backward reads."""
    act = up_act(x, w_up, negative_slope, for_backward)
    return torch.mm(act, w_down.t()), act


@_mlp_forward.register_fake
def _(x, w_up, w_down, negative_slope, for_backward):
    return x.new_empty(x.shape[0], w_down.shape[0]), x.new_empty(x.shape[0], w_up.shape[0])


@torch.library.custom_op("pgolf::mlp_backward", mutates_args=())
def _mlp_backward(dout: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor,
                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_up, dw_down)."""
    dout = dout.contiguous()
    dw_down = torch.mm(dout.t(), act)  # first: cuBLAS also makes a CUDA context current on autograd's thread
    d_pre = down_grad_act(dout, w_down, act, negative_slope)
    return torch.mm(d_pre, w_up), torch.mm(d_pre.t(), x), dw_down


@_mlp_backward.register_fake
def _(dout, x, w_up, w_down, act, negative_slope):
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup_context(ctx, inputs, output) -> None:
    x, w_up, w_down, negative_slope, _ = inputs
    ctx.save_for_backward(x, w_up, w_down, output[1])
    ctx.negative_slope = negative_slope
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _d_act):
    if dout is None:
        return None, None, None, None, None
    dx, dw_up, dw_down = torch.ops.pgolf.mlp_backward(dout, *ctx.saved_tensors, ctx.negative_slope)
    return dx, dw_up, dw_down, None, None


_mlp_forward.register_autograd(_backward, setup_context=_setup_context)
