"""Training runs as rows of bench/results/runs.json: `pgolf bench --add-run RUN_DIR` reads a `pgolf run` directory
(config.json, metrics.jsonl, results.json) and records what the table needs, the command that produced it included.

A later `pgolf eval RUN_DIR/model.pgq --mode lora_ttt --out RUN_DIR/eval_lora_ttt.json` (any `eval_*.json` in the
run directory) adds the artifact's score after test-time training, when the run itself scored without it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pgolf.bench.harness import RESULTS_DIR
from pgolf.train.metrics import METRICS_FILE, read_metrics

RUNS_FILE = "runs"
LATER_EVALS = "eval_*.json"
TTT_MODES = ("ttt", "lora_ttt")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"pgolf bench --add-run: {path} is missing (not a finished `pgolf run` directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"pgolf bench --add-run: {path} is not valid JSON ({exc})") from exc


def last_records(run_dir: str | Path) -> dict[str, dict]:
    """The last metrics.jsonl record of each event name ("timed_start", "warmup", ...) and of each other kind
    ("final", "val", ...) of a run directory."""
    return {str(r.get("event") if r.get("kind") == "event" else r.get("kind")): r for r in read_metrics(run_dir)}


def _round(x: Any, digits: int | None = None) -> float | int | None:
    """x rounded to `digits` (to an int without); None stays None."""
    if x is None:
        return None
    return round(float(x)) if digits is None else round(float(x), digits)


def _eval_description(ev: dict) -> str:
    mode = ev.get("mode", "?")
    what = f"{mode} stride {ev['stride']}" if mode == "sliding" else mode
    seconds = ev.get("seconds_total")
    return (f"{what} on {ev.get('tokens', 0):,} val targets, artifact weights"
            + (f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""))


def run_row(run_dir: str | Path, note: str | None = None) -> dict[str, Any]:
    """One runs.json row from a finished `pgolf run` directory."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    results = _read_json(run_dir / "results.json")
    events = last_records(run_dir) if (run_dir / METRICS_FILE).is_file() else {}
    final, run = events.get("final", {}), config.get("run", {})
    row: dict[str, Any] = {
        "preset": results.get("preset") or config.get("preset") or "custom",
        "command": run.get("command"),
        "train_seconds": _round(results.get("train_seconds"), 1),
        "steps": results.get("steps"),
        "ms_per_step_loop_off": _round(final.get("ms_per_step_loop_off"), 1),
        "ms_per_step_loop_on": _round(final.get("ms_per_step_loop_on"), 1),
        "tokens_per_s_loop_off": _round(final.get("tokens_per_s_loop_off")),
        "tokens_per_s_loop_on": _round(final.get("tokens_per_s_loop_on")),
        "peak_mem_mb": _round(final.get("peak_memory_mb")),
        "val_bpb_prequant": _round(results.get("val_bpb_prequant"), 4),
        "prequant_eval": results.get("prequant_eval"),
        "val_bpb": _round(results.get("val_bpb"), 4),
        "postquant_eval": _eval_description(results["eval"]) if isinstance(results.get("eval"), dict) else None,
        "model_bytes": results.get("model_bytes"), "code_bytes": results.get("code_bytes"),
        "total_bytes": results.get("total_bytes"),
        "quant_over_budget_fallback": results.get("quant_over_budget_fallback"),
        "launch_to_first_step_s": _round(events.get("timed_start", {}).get("since_launch_s"), 1),
        "warmup_s": _round(events.get("warmup", {}).get("seconds"), 1),
        "device": run.get("device_name") or run.get("device"), "torch": run.get("torch"),
        "commit": run.get("commit") or "unknown", "date": (run.get("started") or "")[:10],
        "run_dir": run_dir.name,
    }
    ttt = _best_ttt_eval(run_dir, results)
    if ttt is not None:
        row["val_bpb_ttt"] = _round(ttt[0]["val_bpb"], 4)
        row["ttt_eval"] = _eval_description(ttt[0]) + (f" ({ttt[1]})" if ttt[1] else "")
    if note:
        row["note"] = note
    return {k: v for k, v in row.items() if v is not None}


def _best_ttt_eval(run_dir: Path, results: dict) -> tuple[dict, str] | None:
    """The lowest-bpb TTT-mode score of the artifact: the run's own evaluation or a later `pgolf eval --out` file."""
    found = []
    if isinstance(results.get("eval"), dict) and results["eval"].get("mode") in TTT_MODES:
        found.append((results["eval"], ""))
    for path in sorted(run_dir.glob(LATER_EVALS)):
        ev = _read_json(path)
        if ev.get("mode") in TTT_MODES and "val_bpb" in ev:
            found.append((ev, path.name))
    return min(found, key=lambda f: f[0]["val_bpb"]) if found else None


def add_run(run_dir: str | Path, note: str | None = None, directory: Path | None = None) -> Path:
    """Append the run's row to runs.json (replacing an earlier row of the same command and date)."""
    path = (directory or RESULTS_DIR) / f"{RUNS_FILE}.json"
    new = run_row(run_dir, note)
    rows = json.loads(path.read_text()) if path.is_file() else []
    same = lambda r: r.get("command") == new.get("command") and r.get("date") == new.get("date")  # noqa: E731
    rows = [r for r in rows if not same(r)] + [new]
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path
