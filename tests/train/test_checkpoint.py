"""Checkpoints: atomic writes, the .old fallback, and a killed run that resumes onto the same loss curve."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from pgolf.train import checkpoint as ckpt
from pgolf.train.metrics import read_metrics
from test_trainer import (data, losses, run, tiny_model, tiny_optim,  # noqa: F401 (fixtures)
                          tiny_train)


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = ckpt.atomic_save({"a": torch.arange(3)}, tmp_path / "x.pt")
    assert path.exists() and not (tmp_path / "x.pt.tmp").exists()
    assert torch.equal(torch.load(path)["a"], torch.arange(3))


def test_swap_keeps_one_complete_checkpoint(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, {"step": step}, {"loader": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    shared, local = ckpt.load_checkpoint(tmp_path / "checkpoint")
    assert shared["step"] == 2 and local["loader"] == 2
    # A kill between the two renames of the swap leaves only checkpoint.old: resuming finds it.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint.old"
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    with pytest.raises(ValueError, match="written by 1 ranks"):
        ckpt.load_checkpoint(tmp_path / "checkpoint.old", rank=0, world_size=2)


def test_resume_arguments(tmp_path):
    assert ckpt.resolve_resume("", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None          # nothing yet: a fresh start
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_resume_after_a_kill_continues_the_same_curve(data, tmp_path):
    model = tiny_model(num_layers=3, loop_start=1, loop_end=1, loop_count=2, loop_enable_frac=0.4)
    kw = dict(model=model, iterations=6, final_val=False, swa=True, swa_every=1, swa_start_scale=0.5)
    run(data, tmp_path / "whole", **kw)
    # Killed after step 4; its last checkpoint is from step 3 (after recurrence came on), so step 4 is redone.
    out = tmp_path / "killed"
    halted = run(data, out, checkpoint_every=3, halt_after_step=4, **kw)
    assert halted.stop_reason == "halt" and not (out / "final.pt").exists()
    assert ckpt.read_meta(out / "checkpoint")["step"] == 3
    resumed = run(data, out, resume="auto", warmup_steps=2, **kw)       # warm-up first, then the checkpoint
    assert resumed.step == 6

    whole, again = losses(tmp_path / "whole"), losses(out)
    assert list(again) == [1, 2, 3, 4, 5, 6]                     # steps past the checkpoint logged once
    for step, value in whole.items():
        assert again[step] == pytest.approx(value, rel=1e-6, abs=1e-7), step
    a, b = ckpt.load_final(tmp_path / "whole/final.pt"), ckpt.load_final(out / "final.pt")
    assert a["weights"] == b["weights"] == "swa"
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6)
    events = [(r["event"], r["step"]) for r in read_metrics(out) if r["kind"] == "event"]
    assert ("resume", 3) in events and ("warmup", 0) in events


def test_sigusr1_requests_a_checkpoint(data, tmp_path):
    from pgolf.train.trainer import Trainer

    trainer = Trainer(tiny_model(), tiny_train(data, tmp_path / "sig", iterations=3, final_val=False), tiny_optim())
    model, calls = trainer.model, {"n": 0}

    def forward(x, y):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)                # during step 1
        return model(x, y)

    trainer.forward = forward
    trainer.run()
    saved = [r["step"] for r in read_metrics(tmp_path / "sig") if r.get("event") == "checkpoint"]
    assert saved == [1, 3]                                       # on request, and at the end
