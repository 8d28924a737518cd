"""`pgolf bench`: run benchmark suites on the GPU, write bench/results/<suite>.json and the Markdown report."""
from __future__ import annotations

import argparse
import importlib

SUITES = {
    "mlp": "pgolf.bench.mlp",
    "softcap_ce": "pgolf.bench.softcap_ce",
    "attention": "pgolf.bench.attention",
    "newton_schulz": "pgolf.bench.newton_schulz",
    "gptq": "pgolf.bench.gptq",
    "step": "pgolf.bench.step",
    "startup": "pgolf.bench.startup",
}
KERNEL_SUITES = ("mlp", "softcap_ce", "attention", "newton_schulz", "gptq")
"""What `pgolf bench` runs without names (one device call, about 3 minutes on an H100); `step` (about 3 minutes)
and `startup` (about 4) are named explicitly: `pgolf bench step startup`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", default=[], help=f"suites to run, of {list(SUITES)} (default: the kernel suites {list(KERNEL_SUITES)})")
    parser.add_argument("--report", action="store_true", help="only re-render bench/results/README.md")
    parser.add_argument("--add-run", metavar="RUN_DIR", default=None,
                        help="record a finished `pgolf run` directory as a row of bench/results/runs.json, re-render")
    parser.add_argument("--note", default=None, help="with --add-run: a remark stored with the row")


def main(args: argparse.Namespace) -> int:
    from pgolf.bench.report import write_report

    if args.add_run:
        from pgolf.bench.runs import add_run

        print(f"wrote {add_run(args.add_run, args.note)}")
        print(f"wrote {write_report()}")
        return 0
    if args.report:
        print(f"wrote {write_report()}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("pgolf bench: no CUDA GPU here; benchmarks run on the GPU only (see bench/results for the latest)")
        return 1
    from pgolf.bench.harness import measure_ceilings, write_results

    ceilings = measure_ceilings()
    print(f"ceilings: {ceilings['tflops']:.0f} TFLOP/s bf16 matmul, {ceilings['gbps']:.0f} GB/s copy")
    failed = []
    for name in args.suites or KERNEL_SUITES:
        if name not in SUITES:
            raise SystemExit(f"unknown suite {name!r}; choose from {list(SUITES)}")
        try:
            rows = importlib.import_module(SUITES[name]).run(ceilings)
        except Exception as exc:  # one broken suite must not lose the others' results
            print(f"suite {name} failed: {type(exc).__name__}: {exc}")
            failed.append(name)
            continue
        by_suite: dict[str, list] = {}
        for r in rows:
            by_suite.setdefault(r["bench"], []).append(r)
        for bench, bench_rows in by_suite.items():
            print(f"wrote {write_results(bench, bench_rows)}")
            for r in bench_rows:
                print(f"  {r['bench']:16s} {r['impl']:12s} {r['shape']:28s} {r['median_ms']:9.3f} ms "
                      f"{r.get('tflops', r.get('gbps', ''))}")
    print(f"wrote {write_report()}")
    return 1 if failed else 0
