"""Benchmarks attn_xsa (dense causal, 48 x 2048) and attn_xsa_varlen (document-masked, corpus-like lengths).

Both time one layer's attention (8 query heads, 4 KV heads, head dim 64, bf16) with XSA, forward alone and
forward+backward, for the fused Triton kernel ("pgolf") and the unfused paths. `python -m pgolf.bench.attention
--tune` sweeps the kernels' tile configurations instead (notes/attention.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any, Callable

import torch

from pgolf.bench.harness import median_ms, peak_memory_mb, row
from pgolf.kernels import attention as attn

HQ, HKV, HEAD_DIM = 8, 4, 64
ROWS, SEQ = 48, 2048

# 41 quantiles (0%, 2.5%, ..., 100%) of document lengths in tokens, BOS included, of the 4,554 articles of
# /work/shared/corpus/enwiki-val.jsonl.xz under a SentencePiece BPE 8192 model (the contest settings) trained on
# the first 2,000 articles of enwiki-train-000; mean 1008, median 282, 65% of tokens in articles over 2048.
DOC_LENGTH_QUANTILES = (42, 65, 71, 76, 80, 85, 90, 95, 101, 107, 114, 124, 137, 149, 162, 177, 193, 212, 234, 258,
                        282, 313, 337, 368, 400, 432, 477, 521, 583, 648, 730, 820, 939, 1102, 1354, 1696, 2246, 3365,
                        5157, 7689, 30173)
# The batch benchmarked: its kept-pair fraction 0.725 is near the mean 0.716 (sd 0.076) over seeds 0-39.
VARLEN_SEED = 3


def corpus_cu_seqlens(rows: int = ROWS, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Documents drawn from the quantile table (log-linear between quantiles) and packed end to end into rows of
    `seq` tokens; a document crossing a row boundary is cut there (rows are independent sequences)."""
    gen = torch.Generator().manual_seed(seed)
    qs = torch.tensor(DOC_LENGTH_QUANTILES, dtype=torch.float64).log()
    total = rows * seq
    bounds, pos = {0, total}, 0
    while pos < total:
        u = torch.rand((), generator=gen, dtype=torch.float64).item() * (len(qs) - 1)
        i = min(int(u), len(qs) - 2)
        pos += max(1, round(math.exp(qs[i] + (u - i) * (qs[i + 1] - qs[i]))))
        bounds.add(min(pos, total))
    bounds.update(range(0, total, seq))
    return torch.tensor(sorted(bounds), dtype=torch.int32)


def causal_pairs(cu_seqlens: torch.Tensor) -> int:
    """Query-key pairs that causal document masking keeps: sum over documents of L (L + 1) / 2."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return int((lengths * (lengths + 1) // 2).sum())


def flops(pairs: int, backward: bool) -> float:
    """2 matmuls forward (QK^T, PV), 5 backward (QK^T again, dP, dV, dQ, dK), 2 flops per multiply-add."""
    return (4 + (10 if backward else 0)) * HEAD_DIM * HQ * pairs


def _inputs(total: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(total, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (HQ, HKV, HKV))
    dy = torch.randn(total, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, dy


def _timers(fn: Callable, q, k, v, dy) -> tuple[Callable, Callable]:
    """(forward alone under no_grad, forward + backward to q, k, v)."""
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dy)

    return fwd, fwd_bwd


def _cudnn_core(rows: int) -> Callable:
    """cuDNN SDPA with native GQA if it takes it, else with repeated KV heads (the repeat is timed)."""
    from torch.nn.attention import SDPBackend

    q, k, v, _ = _inputs(rows * 16)
    for repeat in (False, True):
        try:
            attn.sdpa_dense(q, k, v, rows, [SDPBackend.CUDNN_ATTENTION], repeat_kv=repeat)
        except RuntimeError:
            continue
        return lambda q, k, v: attn.sdpa_dense(q, k, v, rows, [SDPBackend.CUDNN_ATTENTION], repeat_kv=repeat)
    raise RuntimeError("cuDNN SDPA refused bf16 causal attention with and without GQA")


def _impls(cu: torch.Tensor, dense_rows: int | None) -> dict[str, tuple[Callable, Callable]]:
    """name -> (with XSA, without XSA) for each path that runs here."""
    total = int(cu[-1])
    max_len = int((cu[1:] - cu[:-1]).max())
    xsa = attn._compiled("xsa")
    out: dict[str, tuple[Callable, Callable]] = {
        "pgolf": (lambda q, k, v: attn.fused_attention(q, k, v, cu, True),
                  lambda q, k, v: attn.fused_attention(q, k, v, cu, False)),
        "eager": (lambda q, k, v: attn.attention_reference(q, k, v, cu, max_len, True),
                  lambda q, k, v: attn.attention_reference(q, k, v, cu, max_len, False)),
    }
    if dense_rows:
        core = _cudnn_core(dense_rows)
        out["cudnn+xsa"] = (lambda q, k, v: xsa(core(q, k, v), v), core)
    mask = attn.flex_document_mask(cu, total)
    flex = lambda q, k, v: attn.flex_varlen(q, k, v, mask)  # noqa: E731
    out["flex+xsa"] = (lambda q, k, v: xsa(flex(q, k, v), v), flex)
    fa = attn.FLASH_ATTN_VARLEN
    if fa is not None:
        core_fa = lambda q, k, v: fa(q, k, v, cu, cu, max_len, max_len, causal=True)  # noqa: E731
        out["flash_attn+xsa"] = (lambda q, k, v: xsa(core_fa(q, k, v), v), core_fa)
    return out


def _tiles() -> str:
    """The kernels' tiles as (block_m, block_n, num_warps, num_stages, heads) for fwd / dq / dkdv."""
    return " / ".join(str(tuple(vars(c).values())) for c in (attn.FWD_CONFIG, attn.DQ_CONFIG, attn.DKDV_CONFIG))


def _suite(bench: str, cu: torch.Tensor, dense_rows: int | None, ceilings: dict, **extra: Any) -> list[dict]:
    total = int(cu[-1])
    q, k, v, dy = _inputs(total)
    pairs = causal_pairs(cu)
    base = f"T={total} H{HQ}/{HKV} D{HEAD_DIM} bf16"
    rows = []
    for name, (with_xsa, without) in _impls(cu, dense_rows).items():
        for tag, fn in (("", with_xsa), (" noxsa", without)):
            if name == "eager" and tag:
                continue
            impl = name.replace("+xsa", "") if tag else name
            fwd, fwd_bwd = _timers(fn, q, k, v, dy)
            try:
                fwd_bwd()
                torch.cuda.synchronize()
            except Exception as exc:  # a path that does not run here is reported, not fatal
                print(f"{bench} {impl}{tag}: {type(exc).__name__}: {exc}")
                continue
            info = dict(extra, tiles=_tiles()) if name == "pgolf" else extra
            rows.append(row(bench, impl, base + tag + " fwd", median_ms(fwd), flops=flops(pairs, False),
                            ceilings=ceilings, **info))
            rows.append(row(bench, impl, base + tag + " fwd+bwd", median_ms(fwd_bwd), flops=flops(pairs, True),
                            ceilings=ceilings, peak_mem_mb=round(peak_memory_mb(fwd_bwd), 1), **info))
    return rows


def run(ceilings: dict) -> list[dict]:
    """attn_xsa: 48 rows of 2048 (cu_seqlens at multiples of 2048); attn_xsa_varlen: corpus-like documents."""
    dense = torch.arange(0, ROWS * SEQ + 1, SEQ, dtype=torch.int32).cuda()
    rows = _suite("attn_xsa", dense, ROWS, ceilings)
    cu = corpus_cu_seqlens(seed=VARLEN_SEED).cuda()
    frac = causal_pairs(cu) / causal_pairs(dense)
    rows += _suite("attn_xsa_varlen", cu, None, ceilings, docs=cu.numel() - 1, flop_frac=round(frac, 4))
    return rows


# (block_m, block_n, num_warps, num_stages, heads): neighbours of the defaults, which won a wider sweep
# (notes/attention.md). dq is swept before dkdv, each with the others' best so far.
CANDIDATES = {
    "fwd": [(64, 64, 8, 3, 2), (64, 64, 8, 4, 2), (64, 64, 8, 2, 2), (64, 64, 4, 3, 2), (32, 64, 4, 3, 2),
            (64, 32, 8, 3, 2)],
    "dq": [(64, 64, 4, 3, 1), (64, 64, 4, 4, 1), (64, 64, 4, 2, 1), (32, 64, 4, 3, 1), (64, 32, 4, 3, 1),
           (128, 64, 8, 3, 1), (64, 64, 4, 3, 2)],
    "dkdv": [(32, 64, 4, 3), (32, 64, 4, 4), (32, 64, 4, 2), (32, 128, 4, 3), (16, 64, 4, 3), (32, 64, 2, 3),
             (64, 64, 4, 3)],
}
_SETTING = {"fwd": "FWD_CONFIG", "dq": "DQ_CONFIG", "dkdv": "DKDV_CONFIG"}


def _max_rel(outs, refs) -> float:
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outs, refs))


def tune(budget_s: float = 150.0) -> list[dict]:
    """Time each candidate tile of each kernel on the dense and the corpus layout and set the module's config to
    the one with the least summed time (in this process only; copy winners into the kernel module by hand).
    fwd: the forward kernel alone; dq, dkdv: the whole backward. A candidate whose outputs differ from the
    default tiles' by more than bf16 rounding is rejected."""
    start = time.time()
    results = []
    layouts = {"dense": torch.arange(0, ROWS * SEQ + 1, SEQ, dtype=torch.int32).cuda(),
               "corpus": corpus_cu_seqlens(seed=VARLEN_SEED).cuda()}
    q, k, v, dy = _inputs(ROWS * SEQ)
    saved = {}
    for name, cu in layouts.items():
        bounds = attn.doc_bounds(cu, ROWS * SEQ)
        y, lse, c = attn._forward(q, k, v, bounds, True)
        grads = attn._backward(dy, q, k, v, bounds, y, lse, c, True)
        saved[name] = (bounds, y, lse, c, grads, causal_pairs(cu))
    for kind, cands in CANDIDATES.items():
        best = (math.inf, None)
        for cand in cands:
            cfg = attn.KernelConfig(*cand)
            total_ms = 0.0
            for layout, (bounds, y, lse, c, grads, pairs) in saved.items():
                if time.time() - start > budget_s:
                    print("tune: time budget spent")
                    return results
                if kind == "fwd":
                    fn = lambda: attn._forward(q, k, v, bounds, True, cfg)[:1]  # noqa: E731
                    ref = (y,)
                else:
                    cfgs = (cfg, attn.DQ_CONFIG) if kind == "dkdv" else (attn.DKDV_CONFIG, cfg)
                    fn = lambda: attn._backward(dy, q, k, v, bounds, y, lse, c, True, cfgs)  # noqa: E731
                    ref = grads
                try:
                    err = _max_rel(fn(), ref)
                    if not err < 1e-2:
                        raise ValueError(f"outputs differ from the default tiles' by {err:.2e}")
                    ms = median_ms(fn, warmup_ms=25, rep_ms=100)
                except Exception as exc:
                    print(f"tune {kind} {cand} {layout}: {type(exc).__name__}: {str(exc)[:200]}")
                    total_ms = math.inf
                    continue
                total_ms += ms
                tflops = (4 if kind == "fwd" else 10) * HEAD_DIM * HQ * pairs / ms / 1e9
                results.append({"kernel": kind, "config": cand, "layout": layout, "ms": round(ms, 4),
                                "tflops": round(tflops, 1), "rel_err_vs_default": err})
                print(f"tune {kind:5s} {str(cand):20s} {layout:7s} {ms:8.4f} ms {tflops:6.1f} TFLOP/s "
                      f"err {err:.1e}", flush=True)
            best = min(best, (total_ms, cand))
        if best[1] is not None and best[0] < math.inf:
            setattr(attn, _SETTING[kind], attn.KernelConfig(*best[1]))
            print(f"tune: {kind} -> {best[1]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tune", action="store_true", help="sweep the tiles first and use the best for the suite")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds the sweep may take")
    parser.add_argument("--out", default="", help="write the sweep as JSON here")
    parser.add_argument("--suite", action="store_true", help="then run the suite and write bench/results")
    args = parser.parse_args()
    if args.tune:
        results = tune(args.budget)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print("configs:", attn.FWD_CONFIG, attn.DQ_CONFIG, attn.DKDV_CONFIG, flush=True)
    if args.suite:
        from pgolf.bench import cli

        cli.main(argparse.Namespace(suites=["attention"], report=False))


if __name__ == "__main__":
    main()
