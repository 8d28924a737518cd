"""Launch to the first timed training step (suite `startup`): `pgolf train` in a fresh process on synthetic shards,
with the record preset, under each compile scope; the figure is the trainer's own `timed_start` event (imports,
data loading, model build, torch.compile, the warm-up steps of every graph and the state restore included).

A fresh process is what a contest run pays; the inductor cache of earlier runs on the same machine still helps, so
only the first case of a fresh machine is a cold start (the row says which case ran first).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pgolf.bench.harness import random_documents, row
from pgolf.bench.runs import last_records
from pgolf.data.shards import write_shard

CASES = {"pr1855:model": ("pr1855", "model"), "pr1855:blocks": ("pr1855", "blocks")}
TIMEOUT_S = 300


def launch_to_first_step(args: list[str], vocab: int, train_tokens: int = 4_000_000,
                         timeout: float = TIMEOUT_S) -> dict[str, float]:
    """Run `pgolf train ARGS --iterations 1` on synthetic shards in a fresh process; returns the seconds from
    launch to the first timed step and of the warm-up, from the run's metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="pgolf-startup-") as tmp:
        write_shard(Path(tmp) / "fineweb_train_000000.bin", random_documents(train_tokens, vocab, seed=1))
        write_shard(Path(tmp) / "fineweb_val_000000.bin", random_documents(65_536, vocab, seed=2))
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "pgolf", "train", *args, "--train-files", f"{tmp}/fineweb_train_*.bin",
               "--val-files", f"{tmp}/fineweb_val_*.bin", "--iterations", "1", "--final-val", "false",
               "--val-every", "0", "--out-dir", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
        if proc.returncode != 0:
            raise RuntimeError(f"pgolf.bench.startup: {' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        events = last_records(out)
    if "timed_start" not in events:
        raise RuntimeError("pgolf.bench.startup: the run logged no timed_start event")
    return {"since_launch_s": events["timed_start"]["since_launch_s"],
            "warmup_s": events.get("warmup", {}).get("seconds", 0.0)}


def run(ceilings: dict) -> list[dict]:
    """The cases named in PGOLF_STARTUP_CASES (comma list of CASES keys; default all), in that order."""
    from pgolf.model.presets import get_preset

    names = [n for n in os.environ.get("PGOLF_STARTUP_CASES", ",".join(CASES)).split(",") if n]
    rows = []
    for i, name in enumerate(names):
        preset, scope = CASES[name]
        try:
            t = launch_to_first_step(["--preset", preset, "--compile-scope", scope], get_preset(preset).vocab_size)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one failing case must not lose the others
            print(f"startup {name}: failed: {str(exc)[-1500:]}", flush=True)
            continue
        impl = "pgolf" if scope == "model" else f"pgolf-{scope}"
        rows.append(row("startup", impl, f"{preset} preset, launch to first timed step, compile scope {scope}",
                        t["since_launch_s"] * 1e3, warmup_s=round(t["warmup_s"], 1),
                        order=f"case {i + 1} of {len(names)} in this process's call"))
        print(f"startup {name}: {t['since_launch_s']:.1f} s (warm-up {t['warmup_s']:.1f} s)", flush=True)
    return rows
