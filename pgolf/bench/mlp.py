"""Benchmark suite `mlp`: the fused LeakyReLU(0.5)^2 MLP, forward+backward and forward (the shape names the pass),
pgolf (Triton) vs eager PyTorch vs torch.compile of the eager module, bf16, at the record shape and a sweep of token
counts. Extra fields: peak_mem_mb (one call), saved_mb (memory the forward keeps for the backward).

Run on a GPU: `python -m pgolf.bench.mlp [--out DIR]` (rows go to bench/results/mlp.json and, with --out, DIR too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from pgolf.bench.harness import median_ms, peak_memory_mb, row, standalone_main, write_results
from pgolf.kernels.dispatch import kernels_mode
from pgolf.kernels.mlp import down_grad_act, fused_mlp, mlp_reference, up_act

DIM, HIDDEN = 512, 2048
TOKENS = (98_304, 49_152, 16_384)  # record shape first: autotuning happens there


def _kernel(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, slope: float) -> torch.Tensor:
    """The Triton kernel itself, whatever `auto` dispatch would pick for this slope (TRITON_SLOPES)."""
    with kernels_mode("triton"):
        return fused_mlp(x, w_up, w_down, slope)


def _impls() -> dict[str, Callable]:
    return {"pgolf": _kernel, "eager": mlp_reference, "compile": torch.compile(mlp_reference, dynamic=False)}


def saved_mb(forward: Callable[[], torch.Tensor]) -> float:
    """Memory the forward leaves allocated (what autograd saved for the backward), its output not counted."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    del out
    return held / 2**20


def bench_shape(tokens: int, dim: int, hidden: int, slope: float, ceilings: dict[str, float],
                impls: dict[str, Callable]) -> list[dict[str, Any]]:
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = (torch.randn(hidden, dim, device="cuda") / dim**0.5).to(torch.bfloat16).requires_grad_()
    w_down = (torch.randn(dim, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    shape = f"{tokens}x{dim}->{hidden}->{dim}" + ("" if slope == 0.5 else f" slope={slope}")
    flops_fwd = 4 * tokens * dim * hidden
    rows = []
    for name, fn in impls.items():
        def forward(fn=fn):
            return fn(x, w_up, w_down, slope)

        def step(fn=fn):
            return torch.autograd.grad(fn(x, w_up, w_down, slope), (x, w_up, w_down), grad)

        try:
            step()
            fwd_ms = median_ms(forward)  # a training forward: what it saves for the backward included
            ms = median_ms(step)
            peak = peak_memory_mb(step)
            saved = saved_mb(forward)
        except Exception as err:  # one failing implementation must not lose the other rows
            print(f"mlp {name} {shape}: {type(err).__name__}: {err}")
            continue
        rows.append(row("mlp", name, f"{shape} fwd+bwd", ms, flops=3 * flops_fwd, ceilings=ceilings,
                        peak_mem_mb=round(peak, 1), saved_mb=round(saved, 1)))
        rows.append(row("mlp", name, f"{shape} fwd", fwd_ms, flops=flops_fwd, ceilings=ceilings))
    return rows


def bench_parts(tokens: int, dim: int, hidden: int, ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """Each kernel of the pgolf forward+backward alone (Triton up+act, Triton d_pre, the cuBLAS matmuls)."""
    x, dout = (torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w_up = (torch.randn(hidden, dim, device="cuda") / dim**0.5).to(torch.bfloat16)
    w_down = (torch.randn(dim, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
    act = up_act(x, w_up, 0.5)
    d_pre = down_grad_act(dout, w_down, act, 0.5)
    parts = {
        "up+act (Triton)": lambda: up_act(x, w_up, 0.5),
        "up (cuBLAS, no epilogue)": lambda: torch.mm(x, w_up.t()),
        "down (cuBLAS)": lambda: torch.mm(act, w_down.t()),
        "d_pre (Triton)": lambda: down_grad_act(dout, w_down, act, 0.5),
        "dact (cuBLAS, no epilogue)": lambda: torch.mm(dout, w_down),
        "dw_down (cuBLAS)": lambda: torch.mm(dout.t(), act),
        "dw_up (cuBLAS)": lambda: torch.mm(d_pre.t(), x),
        "dx (cuBLAS)": lambda: torch.mm(d_pre, w_up),
    }
    flops = 2 * tokens * dim * hidden
    return [row("mlp", "pgolf-part", f"{tokens}x{dim}->{hidden} {name}", median_ms(fn), flops=flops,
                ceilings=ceilings) for name, fn in parts.items()]


def _cases() -> list[tuple[int, int, int, float]]:
    return [(tokens, DIM, HIDDEN, 0.5) for tokens in TOKENS] + [(TOKENS[0], DIM, HIDDEN, 0.0)]


def run(ceilings: dict[str, float], out: Path | None = None) -> list[dict[str, Any]]:
    """All rows; with `out`, each case's rows are also written there as soon as they exist."""
    impls = _impls()
    rows = bench_parts(TOKENS[0], DIM, HIDDEN, ceilings)
    for case in _cases():
        rows += bench_shape(*case, ceilings, impls)
        if out is not None:
            write_results("mlp", rows, out)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'impl':10} {'shape':46} {'ms':>8} {'TFLOP/s':>8} {'frac':>6} {'peakMB':>8} {'savedMB':>8}"]
    for r in rows:
        lines.append(f"{r['impl']:10} {r['shape']:46} {r['median_ms']:8.3f} {r.get('tflops', 0):8.1f} "
                     f"{r.get('frac_ceiling', 0):6.3f} {r.get('peak_mem_mb', 0):8.0f} {r.get('saved_mb', 0):8.0f}")
    return "\n".join(lines)


def main() -> None:
    standalone_main("mlp", __doc__, run, _table)


if __name__ == "__main__":
    main()
