"""Bench suite gptq_model: GPTQ of the record model's matrices (Triton sweep vs the eager reference).

The record model (11 layers, d=512, 8 heads / 4 KV heads of 64, MLP 4x, vocab 8192, tied embedding) has 66
block matrices: per layer q (512x512), k and v (256x512), out (512x512), MLP up (2048x512) and down
(512x2048), plus the 8192x512 embedding. Weights are random with row std ~0.02; Hessians come from random
correlated activations (a decaying spectrum and uneven channel scales, like a trained residual stream), with
q/k/v sharing one, as real calibration gives. Timing covers what `gptq_core` does: scales, Hessian
preparation (fp64 Cholesky, batched per width), the sweep and the inverse permutation.
"""
from __future__ import annotations

import time

import torch

from pgolf.bench.harness import median_ms, row
from pgolf.kernels.gptq import gptq_quantize_reference, gptq_quantize_triton
from pgolf.quant.config import QuantConfig
from pgolf.quant.gptq import gptq_core

LAYERS, D, KV, HIDDEN, VOCAB = 11, 512, 256, 2048, 8192
SHAPE = "11L d512 kv256 mlp2048 + emb8192x512"


def _hessian(c: int, gen: torch.Generator, device: torch.device, rows: int = 4096) -> torch.Tensor:
    spectrum = torch.logspace(0, -2, c, device=device)
    basis, _ = torch.linalg.qr(torch.randn(c, c, device=device, generator=gen))
    channel = torch.exp(0.5 * torch.randn(c, device=device, generator=gen))
    x = torch.randn(rows, c, device=device, generator=gen) @ (basis * spectrum.sqrt()) * channel
    x[:, torch.randperm(c, device=device, generator=gen)[:2]] = 0.0  # a couple of dead inputs
    return x.T @ x / rows


def record_model_problem(device: torch.device | str = "cuda", seed: int = 0):
    """(weights, hessians) shaped like the record model; q/k/v of a layer share one Hessian object."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    w, h = {}, {}

    def mat(name: str, rows: int, cols: int, hess: torch.Tensor) -> None:
        w[name] = 0.02 * torch.randn(rows, cols, device=device, generator=gen)
        h[name] = hess

    for i in range(LAYERS):
        attn_in, proj_in = _hessian(D, gen, device), _hessian(D, gen, device)
        mlp_in, down_in = _hessian(D, gen, device), _hessian(HIDDEN, gen, device)
        p = f"blocks.{i}."
        mat(p + "attn.q.weight", D, D, attn_in)
        mat(p + "attn.k.weight", KV, D, attn_in)
        mat(p + "attn.v.weight", KV, D, attn_in)
        mat(p + "attn.proj.weight", D, D, proj_in)
        mat(p + "mlp.fc.weight", HIDDEN, D, mlp_in)
        mat(p + "mlp.proj.weight", D, HIDDEN, down_in)
    mat("tok_emb.weight", VOCAB, D, _hessian(D, gen, device))
    return w, h


def _config() -> QuantConfig:
    return QuantConfig(quant_min_numel=0, lqer_rank=0)


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


def _wall_ms(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _triton_kernel(block_r: int, num_warps: int):
    def kernel(w, u, s, qm, rm, bs):
        return gptq_quantize_triton(w, u, s, qm, rm, bs, block_r=block_r, num_warps=num_warps)
    return kernel


def sweep_flops(weights: dict[str, torch.Tensor]) -> float:
    """Trailing-update FLOPs (~ rows * cols^2 per matrix), the bulk of GPTQ's arithmetic."""
    return float(sum(w.shape[0] * w.shape[1] ** 2 for w in weights.values()))


def tune(weights, hessians, configs=((16, 4), (32, 4), (16, 2), (32, 8), (64, 8))) -> list[tuple[int, int, float]]:
    """Whole-model wall time (ms) per (block_r, num_warps)."""
    cfg = _config()
    out = []
    for block_r, warps in configs:
        kernel = _triton_kernel(block_r, warps)
        gptq_core(weights, hessians, cfg, kernel=kernel)
        out.append((block_r, warps, _wall_ms(lambda: gptq_core(weights, hessians, cfg, kernel=kernel), 5)))
    return out


def run(ceilings: dict) -> list[dict]:
    weights, hessians = record_model_problem("cuda")
    cfg = _config()
    flops = sweep_flops(weights)
    fast = gptq_core(weights, hessians, cfg)  # warm-up (compiles the kernel)
    ms = median_ms(lambda: gptq_core(weights, hessians, cfg), warmup_ms=200, rep_ms=2000)
    eager_ms = _wall_ms(lambda: gptq_core(weights, hessians, cfg, kernel=gptq_quantize_reference))
    slow = gptq_core(weights, hessians, cfg, kernel=gptq_quantize_reference)
    same = agreement(fast, slow)
    rows = [row("gptq_model", "pgolf", SHAPE, ms, flops=flops, ceilings=ceilings, same_ints=round(same, 6),
                matrices=len(weights)),
            row("gptq_model", "eager", SHAPE, eager_ms, flops=flops, ceilings=ceilings, matrices=len(weights))]
    return rows
