"""Benchmark suite `softcap_ce`: the tied head + softcapped cross-entropy, bf16, vocab 8192.

Shapes ending "fwd+bwd": forward+backward (dh and dW) of the mean loss; "eval": per-token NLL without gradient
(reduction "none", what evaluation calls). pgolf (Triton row kernel, chunked) and its chunking variants
("pgolf-full" = one chunk, i.e. the row kernel over the whole bf16 logits) vs eager PyTorch vs torch.compile of the
eager function vs Liger's fused linear cross-entropy when it is installed. Extra field: peak_mem_mb (one call).

Run on a GPU: `python -m pgolf.bench.softcap_ce [--out DIR]`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

import pgolf.kernels.cross_entropy as ce
from pgolf.bench.harness import median_ms, peak_memory_mb, row, standalone_main, write_results

DIM, VOCAB, CAP = 512, 8192, 30.0
TOKENS = (98_304, 24_576)
CHUNK_VARIANTS = (16384, 32768, 0)


def _with_chunk(rows: int) -> Callable:
    """The pgolf loss with another chunk size than the module's default."""
    def loss(h, w, t, reduction="mean"):
        old, ce.CHUNK_ROWS = ce.CHUNK_ROWS, rows
        try:
            return ce.softcap_cross_entropy(h, w, t, CAP, reduction)
        finally:
            ce.CHUNK_ROWS = old
    return loss


def _liger() -> Callable | None:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:
        return None
    return lambda h, w, t, reduction="mean": liger_fused_linear_cross_entropy(h, w, t, reduction=reduction,
                                                                              softcap=CAP)


def _impls() -> dict[str, Callable]:
    reference = lambda h, w, t, reduction="mean": ce.softcap_cross_entropy_reference(h, w, t, CAP, reduction)  # noqa
    impls = {"pgolf": lambda h, w, t, reduction="mean": ce.softcap_cross_entropy(h, w, t, CAP, reduction)}
    for rows in CHUNK_VARIANTS:
        if rows != ce.CHUNK_ROWS:
            impls["pgolf-full" if rows == 0 else f"pgolf-chunk{rows}"] = _with_chunk(rows)
    impls["eager"] = reference
    impls["compile"] = torch.compile(reference, dynamic=False)
    liger = _liger()
    if liger is not None:
        impls["liger"] = liger
    return impls


def bench_shape(tokens: int, ceilings: dict[str, float], impls: dict[str, Callable]) -> list[dict[str, Any]]:
    h = (torch.randn(tokens, DIM, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(VOCAB, DIM, device="cuda") / DIM**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, VOCAB, (tokens,), device="cuda")
    t[::97] = ce.IGNORE_INDEX
    shape = f"{tokens}x{DIM}->{VOCAB} cap={CAP:g}"
    flops = 2 * tokens * DIM * VOCAB
    rows = []
    for name, fn in impls.items():
        if name.startswith("pgolf-") and tokens != TOKENS[0]:
            continue  # the tuning variants only at the record shape

        def step(fn=fn):
            return torch.autograd.grad(fn(h, w, t), (h, w))

        def evaluate(fn=fn):
            with torch.no_grad():
                return fn(h, w, t, "none")

        try:
            step()
            ms = median_ms(step)
            peak = peak_memory_mb(step)
            evaluate()
            eval_ms = median_ms(evaluate)
            eval_peak = peak_memory_mb(evaluate)
        except Exception as err:  # one failing implementation must not lose the other rows
            print(f"softcap_ce {name} {shape}: {type(err).__name__}: {err}")
            continue
        rows.append(row("softcap_ce", name, f"{shape} fwd+bwd", ms, flops=3 * flops, ceilings=ceilings,
                        peak_mem_mb=round(peak, 1)))
        rows.append(row("softcap_ce", name, f"{shape} eval", eval_ms, flops=flops, ceilings=ceilings,
                        peak_mem_mb=round(eval_peak, 1)))
    return rows


def bench_row_kernel(tokens: int, ceilings: dict[str, float]) -> list[dict[str, Any]]:
    """The row kernel alone over bf16 logits (read z, write dz in place): a memory-bound pass, in GB/s."""
    z0 = (torch.randn(tokens, VOCAB, device="cuda") * 10).to(torch.bfloat16)
    t = torch.randint(0, VOCAB, (tokens,), device="cuda")
    scale = torch.ones(1, device="cuda")
    rows = []
    for warps in (None, 4, 16):
        z = z0.clone()
        ms = median_ms(lambda: ce.softcap_ce_rows_inplace(z, t, CAP, ce.IGNORE_INDEX, scale, num_warps=warps))
        name = "pgolf-rowkernel" + ("" if warps is None else f"-w{warps}")
        rows.append(row("softcap_ce", name, f"{tokens}x{VOCAB} bf16 logits, grad in place", ms,
                        nbytes=2 * z.numel() * z.element_size(), ceilings=ceilings))
    return rows


def run(ceilings: dict[str, float], out: Path | None = None) -> list[dict[str, Any]]:
    """All rows; with `out`, each shape's rows are also written there as soon as they exist."""
    impls = _impls()
    rows = bench_row_kernel(TOKENS[0], ceilings)
    for tokens in TOKENS:
        rows += bench_shape(tokens, ceilings, impls)
        if out is not None:
            write_results("softcap_ce", rows, out)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'impl':17} {'shape':34} {'ms':>8} {'TFLOP/s':>8} {'frac':>6} {'peakMB':>8}"]
    for r in rows:
        lines.append(f"{r['impl']:17} {r['shape']:34} {r['median_ms']:8.3f} {r.get('tflops', 0):8.1f} "
                     f"{r.get('frac_ceiling', 0):6.3f} {r.get('peak_mem_mb', 0):8.0f} {r.get('gbps', '')}")
    return "\n".join(lines)


def main() -> None:
    standalone_main("softcap_ce", __doc__, run, _table)


if __name__ == "__main__":
    main()
