"""`pgolf plot RUN_DIR...`: training loss and val_bpb curves of one or more runs, side by side, to a PNG.

The val_bpb line holds the periodic validations of the raw weights; the star is the final validation of the
exported (EMA/SWA-averaged) weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pgolf.train.metrics import read_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None,
                        help="PNG to write [default: RUN_DIR/curves.png for one run, curves.png for several]")
    parser.add_argument("--x", choices=("step", "time"), default="step",
                        help="horizontal axis: optimizer step or training seconds")
    parser.add_argument("--title", default=None, help="figure title")


def _series(records: list[dict], kind: str, key: str, x: str,
            weights: str | None = None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and r.get(key) is not None and (weights is None or r.get("weights") == weights):
            xs.append(r["elapsed_s"] if x == "time" else r["step"])
            ys.append(r[key])
    return xs, ys


def plot_runs(runs: list[str], out: str | Path, x: str = "step", title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        records = read_metrics(run)
        label = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        ax_loss.plot(*_series(records, "train", "loss", x), label=label, linewidth=1)
        vx, vy = _series(records, "val", "val_bpb", x, weights="raw")   # the final (averaged) one is a star
        fx, fy = _series(records, "final", "val_bpb", x)
        line, = ax_bpb.plot(vx, vy, marker="o", markersize=3, label=label)
        if fy:
            weights = next((r.get("weights") for r in reversed(records) if r.get("kind") == "final"), "")
            ax_bpb.plot(fx, fy, marker="*", markersize=10, linestyle="none", color=line.get_color(),
                        label=f"{label} final, {weights} weights ({fy[-1]:.4f})")
    xlabel = "training seconds" if x == "time" else "step"
    ax_loss.set(xlabel=xlabel, ylabel="train loss (nats/token)", title="training loss")
    ax_bpb.set(xlabel=xlabel, ylabel="val_bpb", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        out = Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 and Path(args.runs[0]).is_dir() \
            else Path("curves.png")
    path = plot_runs(args.runs, out, x=args.x, title=args.title)
    print(f"wrote {path}")
    return 0
