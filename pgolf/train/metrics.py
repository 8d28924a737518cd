"""What a run tells the world: a console line per log step, metrics.jsonl, and config.json beside them.

metrics.jsonl holds one JSON object per line with a "kind":
  train  {step, loss, lr_scale, elapsed_s, ms_per_step, tokens_per_s, recurrence}
  val    {step, val_loss, val_bpb, val_tokens, weights, elapsed_s, seconds}
  event  {step, event, ...}      (warmup, recurrence_on, checkpoint, resume, diverged)
  final  {step, elapsed_s, stop_reason, val_loss, val_bpb, weights, peak_memory_mb, ...}
Only rank 0 writes; on the other ranks every method is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pgolf import config as pconfig
from pgolf.provenance import git_commit

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a run directory's metrics.jsonl (or of the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.exists():
        raise FileNotFoundError(f"{p}: no metrics file (is this a pgolf run directory?)")
    with open(p) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def launch_command() -> str:
    """How this process was started: the `pgolf ...` line when the CLI started it, else its argv."""
    import pgolf

    return pgolf.LAUNCH_COMMAND or shlex.join(sys.argv)


def write_config(out_dir: str | os.PathLike, run_info: dict[str, Any], **configs: Any) -> Path:
    """The resolved configs plus facts about the run (world size, versions, commit) as config.json."""
    path = Path(out_dir) / CONFIG_FILE
    data = {k: pconfig.to_dict(v) for k, v in configs.items()}
    data["run"] = {"torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": launch_command(),
                   "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **run_info}
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_progress(step: int, iterations: int, loss: float, lr_scale: float, ms_per_step: float,
                    tokens_per_s: float, elapsed_s: float, eta_s: float) -> str:
    return (f"step {step}/{iterations} loss {loss:.4f} lr {lr_scale:.3f} {ms_per_step:.1f} ms/step "
            f"{_si(tokens_per_s)} tok/s elapsed {_duration(elapsed_s)} eta {_duration(eta_s)}")


class MetricsLogger:
    """Appends records to OUT_DIR/metrics.jsonl and prints progress (rank 0 only)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / METRICS_FILE
        self._fh = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run redoes those steps), atomically."""
        if not self.enabled or not self.path.exists():
            return
        self.close()  # the rewrite replaces the file: a handle kept open would append to the old one
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as fh:
            for r in kept:
                fh.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def reset(self) -> None:
        """A fresh run starts an empty metrics file."""
        self.close()
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, kind: str, **record: Any) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._fh = open(self.path, "a")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if any(isinstance(v, float) and not math.isfinite(v) for v in record.values()):
            clean["nonfinite"] = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        self._fh.write(json.dumps({"kind": kind, **clean}) + "\n")
        self._fh.flush()

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
