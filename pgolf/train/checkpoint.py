"""Resumable checkpoints and the final export, written so that a kill at any moment leaves a good one.

A checkpoint is a directory OUT_DIR/checkpoint/ holding
  shared.pt    what all ranks share (weights, EMA/SWA, step, elapsed budget, configs), written by rank 0;
  rank{R}.pt   what is rank-local (optimizer shards, loader position, RNG states), one per rank;
  meta.json    step and world size, for people and for the resume check.
It is built in checkpoint.tmp/ and swapped in by renames, so the previous checkpoint stays whole until the
new one is complete (a kill mid-swap leaves checkpoint.old/, which `find_checkpoint` falls back to).

The final export OUT_DIR/final.pt is {"model_config", "model" (the averaged weights), "train_config", ...},
what the quantizer and the evaluator read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pgolf.train import distributed as pdist

CHECKPOINT_DIR = "checkpoint"
FINAL_FILE = "final.pt"
SHARED_FILE = "shared.pt"
META_FILE = "meta.json"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, fsync, then rename over `path`: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def save_checkpoint(out_dir: str | os.PathLike, shared: dict, local: dict, rank: int = 0,
                    world_size: int = 1) -> Path:
    """Collective (every rank calls it): write this rank's part, then rank 0 swaps the directory in."""
    out = Path(out_dir)
    final, tmp, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".tmp"), out / (CHECKPOINT_DIR + ".old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    pdist.barrier()
    atomic_save(local, tmp / _rank_file(rank))
    if rank == 0:
        atomic_save(shared, tmp / SHARED_FILE)
        with open(tmp / META_FILE, "w") as fh:
            json.dump({"step": shared.get("step"), "world_size": world_size}, fh)
    pdist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    pdist.barrier()
    return final


def clear_outputs(out_dir: str | os.PathLike) -> None:
    """A fresh run in an old run directory: drop the old final.pt and checkpoints, so that nothing of the old
    run can pass for this run's (e.g. as "the last good checkpoint" after a NaN)."""
    out = Path(out_dir)
    (out / FINAL_FILE).unlink(missing_ok=True)
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp", CHECKPOINT_DIR + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)


def _complete(path: Path) -> bool:
    return (path / SHARED_FILE).is_file() and (path / META_FILE).is_file()


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The usable checkpoint at `path` (a checkpoint dir or a run dir), or the .old one a kill left behind."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_DIR, path.with_name(path.name + ".old"),
                      path / (CHECKPOINT_DIR + ".old")):
        if _complete(candidate):
            return candidate
    return None


def resolve_resume(resume: str, out_dir: str | os.PathLike) -> Path | None:
    """`--resume` value -> checkpoint dir: "" none, "auto" OUT_DIR's own when present, else that path."""
    if not resume:
        return None
    if resume == "auto":
        return find_checkpoint(Path(out_dir) / CHECKPOINT_DIR)
    found = find_checkpoint(resume)
    if found is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there "
                                f"(expected {SHARED_FILE} and {META_FILE} in a checkpoint directory)")
    return found


def read_meta(path: str | os.PathLike) -> dict:
    with open(Path(path) / META_FILE) as fh:
        return json.load(fh)


def load_checkpoint(path: str | os.PathLike, rank: int = 0, world_size: int = 1,
                    map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(shared, local) for this rank; the world size must be the one that wrote it (per-rank state)."""
    path = Path(path)
    meta = read_meta(path)
    if meta["world_size"] != world_size:
        raise ValueError(f"{path} was written by {meta['world_size']} ranks; resuming it needs the same number "
                         f"(this run has {world_size})")
    # Our own files hold numpy and Python RNG states, which the weights-only unpickler refuses.
    shared = torch.load(path / SHARED_FILE, map_location=map_location, weights_only=False)
    local = torch.load(path / _rank_file(rank), map_location=map_location, weights_only=False)
    return shared, local


def save_final(path: str | os.PathLike, model_config: dict, model_state: dict[str, torch.Tensor],
               train_config: dict, **extra: Any) -> Path:
    """The exported model: weights on the CPU, with the configs needed to rebuild and judge it."""
    state = {k: v.detach().to("cpu") for k, v in model_state.items()}
    return atomic_save({"model_config": model_config, "model": state, "train_config": train_config, **extra},
                       path)


def load_final(path: str | os.PathLike) -> dict:
    """Read a final.pt (the weights-only unpickler suffices: dicts, tensors and plain values)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)
