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


def _triton_kernel(block_r: int, num_warps: int, prefetch: bool):
    def kernel(w, u, s, qm, rm, bs):
        return gptq_quantize_triton(w, u, s, qm, rm, bs, block_r=block_r, num_warps=num_warps, prefetch=prefetch)
    return kernel


def sweep_flops(weights: dict[str, torch.Tensor]) -> float:
    """Trailing-update FLOPs (~ rows * cols^2 per matrix), the bulk of GPTQ's arithmetic."""
    return float(sum(w.shape[0] * w.shape[1] ** 2 for w in weights.values()))


TUNING = ((16, 4, True), (16, 4, False), (16, 2, True), (32, 4, True), (32, 8, True), (64, 8, True), (16, 1, True))


def tune(weights, hessians, configs=TUNING) -> list[tuple[int, int, bool, float]]:
    """Whole-model wall time (ms) per (block_r, num_warps, prefetch)."""
    cfg = _config()
    out = []
    for block_r, warps, prefetch in configs:
        kernel = _triton_kernel(block_r, warps, prefetch)
        gptq_core(weights, hessians, cfg, kernel=kernel)
        out.append((block_r, warps, prefetch,
                    _wall_ms(lambda: gptq_core(weights, hessians, cfg, kernel=kernel), 5)))
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


def options_table(weights, hessians) -> list[dict]:
    """Wall time and mean relative Hessian-weighted error of the full quantizer under each option."""
    from pgolf.quant.gptq import quantize_weights

    base = QuantConfig(quant_min_numel=0, lqer_rank=0)
    variants = {"gptq sdclip": {}, "rtn sdclip": {"gptq": False}, "+hadamard": {"hadamard": True},
                "+awq": {"awq": True}, "+lqer r4 top3": {"lqer_rank": 4}, "clip search": {"clip_mode": "search"},
                "clip percentile": {"clip_mode": "percentile"}}
    out = []
    for label, changes in variants.items():
        cfg = base.replace(**changes)
        quantize_weights(weights, hessians, cfg, to_cpu=False)  # warm
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, rep = quantize_weights(weights, hessians, cfg, to_cpu=False)
        seconds = time.perf_counter() - t0
        errs = [t["rel_error"] for t in rep["tensors"].values()]
        out.append({"option": label, "seconds": round(seconds, 3), "mean_rel_error": sum(errs) / len(errs),
                    "breakdown": {k: round(v, 4) for k, v in rep["seconds"].items()}})
    return out


def export_table(weights, hessians, budget: int = 16_000_000) -> list[dict]:
    """End-to-end export (quantize + rANS artifact, in memory) under the byte budget for budget-driven options."""
    from pgolf.quant.artifact import export_state_dict

    state = {n: w for n, w in weights.items()}
    variants = {"sdclip int6/7 + lqer": {}, "adaptive k": {"clip_mode": "adaptive"},
                "mixed bits + adaptive k": {"clip_mode": "adaptive", "mixed_bits": True}}
    out = []
    for label, changes in variants.items():
        cfg = QuantConfig(quant_min_numel=0, compressor="rans", artifact_budget_bytes=budget, report_only=True,
                          **changes)
        t0 = time.perf_counter()
        qm, rep = export_state_dict(state, hessians, cfg)
        seconds = time.perf_counter() - t0
        errs = [t["rel_error"] for t in rep["quant"]["tensors"].values()]
        bits = sorted({qt.bits for qt in qm.tensors.values()})
        out.append({"export": label, "seconds": round(seconds, 2),
                    "quant_seconds": round(rep["quant"]["seconds"]["total"], 3), "bytes": rep["model_bytes"],
                    "mean_rel_error": sum(errs) / len(errs), "bits_used": bits})
    return out


def main(argv: list[str] | None = None) -> None:
    """Device run: suite rows, tuning sweep, option table, export table, a rANS artifact in $OUT.

    `python -m pgolf.bench.gptq [suite] [tune] [options] [export] [artifact]` (default: all).
    """
    import json
    import os
    import sys
    from pathlib import Path

    from pgolf.bench.harness import measure_ceilings, write_results
    from pgolf.quant.artifact import build_quantized_model, save_artifact
    from pgolf.quant.gptq import quantize_weights

    parts = set((argv if argv is not None else sys.argv[1:]) or ["suite", "tune", "options", "export", "artifact"])
    out = Path(os.environ.get("OUT", "."))
    extra: dict = {}
    rows = run(measure_ceilings()) if "suite" in parts else []
    weights, hessians = record_model_problem("cuda")
    if "tune" in parts:
        extra["tuning"] = tune(weights, hessians)
        print("\nblock_r warps prefetch  ms")
        for block_r, warps, prefetch, ms in extra["tuning"]:
            print(f"{block_r:7d} {warps:5d} {str(prefetch):8s} {ms:8.2f}")
    if "options" in parts:
        extra["options"] = options_table(weights, hessians)
        print("\noption              s      mean rel err")
        for o in extra["options"]:
            print(f"{o['option']:18s} {o['seconds']:6.3f}  {o['mean_rel_error']:.5f}  {o['breakdown']}")
    if "export" in parts:
        extra["export"] = export_table(weights, hessians)
        print("\nexport                      s   quant_s      bytes  mean rel err  bits")
        for e in extra["export"]:
            print(f"{e['export']:24s} {e['seconds']:6.2f} {e['quant_seconds']:7.3f} {e['bytes']:10,d}  "
                  f"{e['mean_rel_error']:.5f}  {e['bits_used']}")
    if "artifact" in parts:
        qts, _ = quantize_weights(weights, hessians, QuantConfig(quant_min_numel=0))
        qm = build_quantized_model({n: w.cpu() for n, w in weights.items()}, qts, QuantConfig(quant_min_numel=0))
        t0 = time.perf_counter()
        extra["artifact"] = save_artifact(qm, out / "synthetic_record.pgq", compressor="rans", report_only=True)
        extra["artifact_seconds"] = time.perf_counter() - t0
        print(f"\nrANS artifact {extra['artifact']['model_bytes']:,} B in {extra['artifact_seconds']:.1f} s")
    if rows:
        write_results("gptq_model", rows, directory=out)
        print("\nbench impl   median_ms  same_ints")
        for r in rows:
            print(f"{r['bench']} {r['impl']:6s} {r['median_ms']:10.2f}  {r.get('same_ints', '')}  {r['device']}")
    (out / "gptq_extra.json").write_text(json.dumps(extra, indent=1, default=str))


if __name__ == "__main__":
    main()
