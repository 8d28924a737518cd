"""Bench suite `newton_schulz`: benches "newton_schulz" (the record's 66 bank matrices through 5 Polar Express
steps) and "optimizer_step" (the whole MuonAdam step for the record model's parameter shapes).

Impls: "pgolf" (Triton plan replayed as a CUDA graph), "pgolf-nograph" (same launches, eager), "eager"
(batched torch matmuls, `newton_schulz_reference` per shape), "compile" (torch.compile of that reference).
`python -m pgolf.bench.newton_schulz [--tune]` runs the suite on the GPU, writes bench/results/newton_schulz.json
and prints a table; --tune also times tile-size variants of the plan.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch

from pgolf.bench.harness import measure_ceilings, median_ms, profile_calls, row, write_results
from pgolf.kernels import newton_schulz as ns

RECORD_BANKS = [(22, 512, 512), (22, 256, 512), (11, 2048, 512), (11, 512, 2048)]
TRAIN_STEP_MS = 95.8  # the record's 8xH100 step before looping (CHALLENGE.md), for the optimizer's share
WORLD = 8

BN256 = {"update": {"BN": 256}}
POLY64 = {"poly": {"BS": 64, "BK": 64, "warps": 4}}
TUNE_VARIANTS: dict[str, dict[str, dict[str, int]]] = {
    "default": {},
    "nofold": {"fold": {"on": 0}},
    "upd_bn256": BN256,
    "upd_s4": {"update": {"stages": 4}},
    "poly64": POLY64,
    "gram_s4": {"gram": {"stages": 4}},
    "chunks2": {"chunks": {"n": 2}},
    "chunks4": {"chunks": {"n": 4}},
    "bn256_poly64": {**BN256, **POLY64},
    "chunks2_bn256": {**BN256, "chunks": {"n": 2}},
}


def shard_shapes(shapes: list[tuple[int, int, int]], world: int) -> list[tuple[int, int, int]]:
    """What one rank orthogonalizes under Parallel Muon with `world` ranks."""
    return [(-(-b // world), m, n) for b, m, n in shapes]


def label(shapes: list[tuple[int, int, int]]) -> str:
    return "+".join(f"{b}x{m}x{n}" for b, m, n in shapes)


def ns_rows(shapes: list[tuple[int, int, int]], ceilings: dict[str, float], tag: str = "",
            compile_too: bool = True, blocks: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
    inputs = [torch.randn(s, device="cuda").bfloat16() for s in shapes]
    flops = ns.flops(shapes, symmetric=False)
    extra = {"sym_flops": ns.flops(shapes), "min_bytes": ns.min_bytes(shapes), "blocks": blocks or "default"}
    shape = label(shapes) + tag
    rows = []
    plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", blocks=blocks)
    for inp, g in zip(plan.inputs, inputs):
        inp.copy_(g)
    rows.append(row("newton_schulz", "pgolf", shape, median_ms(plan.run), flops, ceilings=ceilings, **extra))
    eager_plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", graph=False, blocks=blocks)
    rows.append(row("newton_schulz", "pgolf-nograph", shape, median_ms(eager_plan.run), flops, ceilings=ceilings))
    ref = ns.newton_schulz_reference
    rows.append(row("newton_schulz", "eager", shape, median_ms(lambda: [ref(g) for g in inputs]), flops,
                    ceilings=ceilings))
    if not compile_too:
        return rows
    compiled = torch.compile(ref)
    rows.append(row("newton_schulz", "compile", shape, median_ms(lambda: [compiled(g) for g in inputs]), flops,
                    ceilings=ceilings))
    return rows


def record_param_groups(device: str = "cuda") -> dict[str, list[torch.nn.Parameter]]:
    """The record model's trainable shapes: 4 matrix banks, the tied 8192x512 embedding, vectors/scalars."""
    mk = lambda *s: torch.nn.Parameter(torch.randn(*s, device=device) * 0.02)  # noqa: E731
    return {"matrix": [mk(*s) for s in RECORD_BANKS], "embed": [mk(8192, 512)],
            "scalar": [mk(512) for _ in range(60)] + [mk(1) for _ in range(30)]}


def gpu_ms(fn: Any, reps: int = 5) -> float:
    """Device time of one call of `fn` (sum of its kernels), from the profiler: what the step costs the GPU
    when the CPU runs ahead, as it does inside a training step."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                for e in prof.key_averages())
    return total / reps / 1000


def optimizer_rows(ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """The whole step (clip, momentum, MuonEq-R, Newton-Schulz, update, AdamW) on one GPU. The fused path does
    not overwrite the gradients, so the same gradients serve every timed call."""
    from pgolf.train.optim import OptimConfig, build_optimizer

    rows = []
    n_params = sum(p.numel() for ps in record_param_groups("meta").values() for p in ps)
    for impl, mode in (("pgolf", "auto"), ("eager", "reference")):
        os.environ["PGOLF_KERNELS"] = mode
        groups = record_param_groups()
        opt = build_optimizer(groups, OptimConfig())
        for ps in groups.values():
            for p in ps:
                p.grad = torch.randn_like(p) * 0.01
        ms, dev = median_ms(opt.step), gpu_ms(opt.step)
        rows.append(row("optimizer_step", impl, f"record {n_params / 1e6:.1f}M params, 1 GPU", ms,
                        ceilings=ceilings, gpu_ms=round(dev, 4), share_of_train_step=round(dev / TRAIN_STEP_MS, 4)))
    os.environ["PGOLF_KERNELS"] = "auto"
    return rows


def run(ceilings: dict[str, float], compile_too: bool = True,
        blocks: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
    kw = {"compile_too": compile_too, "blocks": blocks}
    rows = ns_rows(RECORD_BANKS, ceilings, **kw)
    for shape in RECORD_BANKS:
        rows += ns_rows([shape], ceilings, compile_too=False, blocks=blocks)
    rows += ns_rows(shard_shapes(RECORD_BANKS, WORLD), ceilings, tag=f" (1/{WORLD} shard)", **kw)
    rows += optimizer_rows(ceilings)
    return rows


def tune(shapes: list[tuple[int, int, int]]) -> list[tuple[str, float, float]]:
    """Time each tile variant of the graph-replayed plan; returns (name, ms, rel err vs fp64)."""
    gs = [torch.randn(s, device="cuda") for s in shapes]
    ref = [ns.newton_schulz_reference(g[:2].double(), 5, "polar_express", dtype=torch.float64) for g in gs]
    out = []
    for name, blocks in TUNE_VARIANTS.items():
        try:
            plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", blocks=blocks)
            res = plan.as_orthogonalizer()(gs)
            err = max(((o[:2].double() - r).norm() / r.norm()).item() for o, r in zip(res, ref))
            out.append((name, median_ms(plan.run), err))
        except Exception as exc:  # a variant that does not compile (shared memory) is reported, not fatal
            out.append((name, float("nan"), float("nan")))
            print(f"variant {name}: {type(exc).__name__}: {str(exc)[:200]}")
    return out


def _kernel_table(fn: Callable[[], Any], rows: int, runs: int = 5) -> str:
    """The profiler's per-kernel CUDA time table over `runs` calls of `fn` (already warmed up)."""
    return profile_calls(fn, runs).key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def profile_optimizer() -> str:
    """Per-kernel GPU time of the whole optimizer step on one GPU."""
    from pgolf.train.optim import OptimConfig, build_optimizer

    groups = record_param_groups()
    opt = build_optimizer(groups, OptimConfig())
    params = [p for ps in groups.values() for p in ps]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt.step()
    return _kernel_table(opt.step, rows=25)


def profile(shapes: list[tuple[int, int, int]], blocks: dict[str, dict[str, int]] | None = None) -> str:
    """Per-kernel GPU time of one eager run of the plan (which launch kind costs what)."""
    plan = ns.NewtonSchulzPlan(shapes, 5, "polar_express", graph=False, blocks=blocks)
    for inp in plan.inputs:
        inp.copy_(torch.randn(inp.shape, device="cuda"))
    plan.run()
    return _kernel_table(plan.run, rows=12)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'bench':15} {'impl':14} {'ms':>9} {'TFLOP/s':>8}  shape"]
    for r in rows:
        lines.append(f"{r['bench']:15} {r['impl']:14} {r['median_ms']:9.4f} {r.get('tflops', ''):>8}  {r['shape']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true", help="also time tile-size variants of the plan")
    parser.add_argument("--no-write", action="store_true", help="print only, leave bench/results alone")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--profile", action="store_true", help="print the per-kernel time of the record plan")
    args = parser.parse_args(argv)
    ceilings = measure_ceilings()
    print(f"ceilings: {ceilings}")
    best = None
    if args.tune:
        for shapes in (RECORD_BANKS, shard_shapes(RECORD_BANKS, WORLD)):
            results = tune(shapes)
            for name, ms, err in results:
                print(f"tune {label(shapes):40} {name:14} {ms:8.4f} ms  rel err {err:.2e}")
            if best is None:
                best = min((r for r in results if r[1] == r[1]), key=lambda r: r[1])[0]
        print(f"best variant for the record banks: {best} {TUNE_VARIANTS[best]}")
    if args.profile:
        print(profile(RECORD_BANKS))
        print(profile_optimizer())
    rows = run(ceilings, compile_too=not args.skip_compile, blocks=TUNE_VARIANTS[best] if best else None)
    print(table(rows))
    if not args.no_write:
        print(f"wrote {write_results('newton_schulz', rows)}")


if __name__ == "__main__":
    main()
