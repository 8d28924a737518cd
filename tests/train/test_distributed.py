"""2 gloo ranks under torchrun against 1 rank with gradient accumulation: the same run, to fp tolerance.

Covers the distributed paths of training: per-rank data (the loader's rank spans), Parallel Muon and the
packed all-reduce inside the optimizer, the per-step agreement on loss and clock, validation split over
ranks, per-rank checkpoint files and a resume of the 2-rank run after a kill.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.train.checkpoint import load_checkpoint, load_final, read_meta
from pgolf.train.distributed import DistInfo, init_distributed
from pgolf.train.metrics import read_metrics
from test_trainer import (data, losses, run, tiny_model, tiny_optim,  # noqa: F401 (fixtures)
                          tiny_train)

REPO = Path(__file__).resolve().parents[2]


def _flags(*configs) -> list[str]:
    """--field value for every field that differs from its class default."""
    out = []
    for cfg in configs:
        default = type(cfg)()
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if value == getattr(default, f.name):
                continue
            text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            out += ["--" + f.name.replace("_", "-"), text]
    return out


def _torchrun(nproc: int, *configs, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # containers whose hostname resolves to no usable address
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pgolf", "train", *_flags(*configs)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_plain_process_has_no_group():
    info = init_distributed("cpu")
    assert info == DistInfo(device=torch.device("cpu")) and info.is_main and not info.distributed


@pytest.mark.distributed
def test_two_gloo_ranks_match_one_rank_with_accumulation(data, tmp_path):
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, loop_count=2, loop_enable_frac=0.5)
    optim = tiny_optim()
    common = dict(iterations=5, sampler="coprime", val_every=2)
    one = run(data, tmp_path / "one", model=model, optim=optim, grad_accum_steps=2, **common)

    out = tmp_path / "two"
    two_cfg = tiny_train(data, out, grad_accum_steps=1, **common)
    proc = _torchrun(2, model, dataclasses.replace(two_cfg, checkpoint_every=2, halt_after_step=3), optim)
    assert "world size 2 (gloo)" in proc.stdout and "2 ranks x 1 micro-steps x 2 rows x 64" in proc.stdout
    ckpt = out / "checkpoint"
    assert read_meta(ckpt) == {"step": 2, "world_size": 2}
    _, local1 = load_checkpoint(ckpt, rank=1, world_size=2)
    _, local0 = load_checkpoint(ckpt, rank=0, world_size=2)
    assert local0["loader"]["cursor"] == local1["loader"]["cursor"]     # one global stream position
    _torchrun(2, model, dataclasses.replace(two_cfg, resume="auto"), optim)

    a, b = losses(tmp_path / "one"), losses(out)
    assert list(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5), (step, a[step], b[step])
    val_a = [(r["step"], r["val_bpb"]) for r in read_metrics(tmp_path / "one") if r["kind"] == "val"]
    val_b = [(r["step"], r["val_bpb"]) for r in read_metrics(out) if r["kind"] == "val"]
    assert [s for s, _ in val_a] == [s for s, _ in val_b] == [2, 4, 5]
    for (_, x), (_, y) in zip(val_a, val_b):
        assert math.isclose(x, y, rel_tol=1e-5)
    fa, fb = load_final(tmp_path / "one/final.pt"), load_final(out / "final.pt")
    assert fa["recurrence_active"] and fb["recurrence_active"]
    for k, v in fa["model"].items():
        torch.testing.assert_close(fb["model"][k], v, rtol=1e-4, atol=1e-5)
    assert one.val_bpb == pytest.approx(fb["val_bpb"], rel=1e-5)
