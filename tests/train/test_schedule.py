"""The wall-clock schedule: LR scale, progress in time and step modes, recurrence switch, the pausable clock."""
import math

import pytest

from pgolf.train.config import TrainConfig, grad_accum_for
from pgolf.train.schedule import Clock, Schedule, recurrence_due


@pytest.mark.parametrize("progress, expected", [
    (0.0, 1.0), (0.1, 1.0), (0.15, 1.0),        # before the warmdown (1 - 0.85 = 0.15)
    (0.5, 0.5 / 0.85), (0.8, 0.2 / 0.85),         # linear towards 0 at progress 1 ...
    (0.95, 0.1), (1.0, 0.1), (1.3, 0.1),          # ... but never below the floor
])
def test_lr_scale_warmdown_with_floor(progress, expected):
    s = Schedule(iterations=1000, budget_seconds=600.0, warmdown_frac=0.85, lr_floor=0.1)
    assert math.isclose(s.lr_scale(progress), expected, rel_tol=1e-12)


def test_no_warmdown_keeps_full_lr():
    s = Schedule(iterations=10, warmdown_frac=0.0, lr_floor=0.1)
    assert [s.lr_scale(p) for p in (0.0, 0.5, 0.99, 1.0)] == [1.0] * 4


def test_progress_time_mode_takes_the_binding_limit():
    s = Schedule(iterations=1000, budget_seconds=100.0)
    assert s.progress(10, 50.0) == 0.5             # the clock binds
    assert s.progress(900, 10.0) == 0.9            # the step limit binds
    assert not s.finished(999, 99.9)
    assert s.finished(10, 100.0) and s.finished(1000, 1.0)


def test_progress_step_mode_ignores_time():
    s = Schedule(iterations=400, budget_seconds=0.0)
    assert s.progress(100, 1e9) == 0.25
    assert not s.finished(399, 1e9) and s.finished(400, 0.0)


def test_budget_leaves_the_reserve():
    cfg = TrainConfig(max_wallclock_seconds=600.0, reserve_seconds=30.0, iterations=5000)
    s = Schedule.from_config(cfg)
    assert s.budget_seconds == 570.0 and s.iterations == 5000
    assert Schedule.from_config(TrainConfig(max_wallclock_seconds=0.0)).budget_seconds == 0.0
    assert Schedule.from_config(TrainConfig()).budget_seconds == 588.0   # the default keeps 12 s for GPTQ


def test_lr_at_chosen_times_of_a_600s_run():
    s = Schedule.from_config(TrainConfig(max_wallclock_seconds=600.0, reserve_seconds=0.0, iterations=10**6))
    # warmdown starts at 90 s, scale 0.5 at 90 + 0.5*510 = 345 s, floor 0.1 from 0.9*600 = 540 s on.
    assert s.lr_scale(s.progress(0, 89.0)) == 1.0
    assert math.isclose(s.lr_scale(s.progress(0, 345.0)), 0.5, rel_tol=1e-12)
    assert math.isclose(s.lr_scale(s.progress(0, 480.0)), 120 / 510, rel_tol=1e-12)
    assert s.lr_scale(s.progress(0, 560.0)) == 0.1


def test_recurrence_switch():
    s = Schedule(iterations=100, budget_seconds=600.0)
    assert not recurrence_due(s.progress(0, 209.9), 0.35)
    assert recurrence_due(s.progress(0, 210.0), 0.35)
    assert recurrence_due(0.0, 0.0)
    assert not recurrence_due(1.0, None) and not recurrence_due(1.0, -1.0)


def test_eta():
    s = Schedule(iterations=100, budget_seconds=60.0)
    assert s.eta_seconds(50, 10.0, 0.1) == 5.0     # steps run out first
    assert s.eta_seconds(50, 58.0, 1.0) == 2.0     # the budget runs out first
    assert Schedule(iterations=100).eta_seconds(90, 0.0, 2.0) == 20.0


def test_clock_pauses_and_carries_over():
    t = [0.0]
    clock = Clock(elapsed_s=3.0, now=lambda: t[0])
    assert clock.elapsed() == 3.0 and not clock.running
    clock.start()
    t[0] = 5.0
    assert clock.elapsed() == 8.0
    clock.pause()
    t[0] = 100.0                                   # paused time (validation) does not count
    assert clock.elapsed() == 8.0
    clock.start()
    t[0] = 102.5
    assert clock.elapsed() == 10.5


def test_clock_syncs_before_reading():
    calls = []
    clock = Clock(sync=lambda: calls.append(1))
    clock.start()
    clock.elapsed()
    clock.pause()
    assert len(calls) == 3


def test_grad_accum_reproduces_the_8_gpu_batch():
    cfg = TrainConfig()
    assert [grad_accum_for(cfg, w, 2048) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    # tokens per micro-batch per rank are the same on every world size: 786432 / 8 = 48 rows of 2048
    for w in (1, 2, 4, 8):
        assert cfg.train_batch_tokens // (w * grad_accum_for(cfg, w, 2048)) == 48 * 2048
    with pytest.raises(ValueError, match="does not divide"):
        grad_accum_for(cfg, 3, 2048)
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum_for(TrainConfig(train_batch_tokens=1000), 1, 2048)
