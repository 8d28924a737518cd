"""Timing, ceilings and result rows shared by every benchmark suite.

Rows follow bench/results/<suite>.json: {"bench", "impl", "shape", "median_ms", "tflops" or "gbps",
"device", "torch", "triton", "commit", "date"} plus optional extras (peak_mem_mb, frac_ceiling, ...).
Our own rows have impl "pgolf".
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pgolf import BOS_ID
from pgolf.provenance import git_commit

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def median_ms(fn: Callable[[], Any], warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median time of `fn` in ms, CUDA-event timed after warm-up, the L2 flushed between calls."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak CUDA memory allocated by one call of `fn`, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings() -> dict[str, float]:
    """The two ceilings on this device: a large bf16 matmul (TFLOP/s) and a large device copy (GB/s)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    return {"tflops": 2 * n**3 / ms / 1e9, "gbps": 2 * src.numel() * 4 / copy_ms / 1e6}


def environment() -> dict[str, str]:
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def row(bench: str, impl: str, shape: str, ms: float, flops: float | None = None, nbytes: float | None = None,
        ceilings: dict[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """One result row; TFLOP/s from `flops`, GB/s from `nbytes`, and their fraction of the ceilings."""
    out: dict[str, Any] = {"bench": bench, "impl": impl, "shape": shape, "median_ms": round(ms, 4)}
    if flops is not None:
        out["tflops"] = round(flops / ms / 1e9, 1)
        if ceilings:
            out["frac_ceiling"] = round(out["tflops"] / ceilings["tflops"], 3)
    if nbytes is not None:
        out["gbps"] = round(nbytes / ms / 1e6, 1)
        if ceilings and flops is None:
            out["frac_ceiling"] = round(out["gbps"] / ceilings["gbps"], 3)
    out.update(extra)
    out.update(environment())
    return out


def write_results(suite: str, rows: list[dict[str, Any]], directory: Path | None = None) -> Path:
    """Replace the rows of the same (bench, impl, shape) in bench/results/<suite>.json, keep the others."""
    directory = directory or RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{suite}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["bench"], r["impl"], r["shape"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return path


def standalone_main(suite: str, doc: str | None, run: Callable, table: Callable[[list], str]) -> None:
    """`python -m pgolf.bench.<suite> [--out DIR]`: measure the ceilings, run the suite (rows also written to
    DIR as they come, so a killed run keeps them), write bench/results/<suite>.json and print a table."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or suite).splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"also write {suite}.json here")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print("ceilings", ceilings)
    rows = run(ceilings, args.out)
    write_results(suite, rows)
    print(table(rows))


def random_documents(n_tokens: int, vocab: int, median_doc: float = 900.0, seed: int = 0) -> np.ndarray:
    """Random token ids with BOS at document starts; log-normal document lengths (sigma 1) around `median_doc`
    (about the shared corpus's median), so document-masked attention sees realistic boundaries."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, n_tokens, dtype=np.int64)
    pos = 0
    while pos < n_tokens:
        tokens[pos] = BOS_ID
        pos += max(2, int(rng.lognormal(np.log(median_doc), 1.0)))
    return tokens


def profile_calls(fn: Callable[[], Any], runs: int, cuda: bool = True):
    """torch.profiler over `runs` calls of `fn` (already warmed up): CUDA kernels, or CPU ops with cuda=False."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
        sync()
    return prof
